"""attach_exits on user models the library does not ship."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import eenn


class ResCat(nn.Module):
    """A residual add and a concatenation, both spanning the cut points used below."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.mix = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        s = self.stem(x)
        a = torch.relu(self.a(s))
        r = a + s  # residual: `s` is alive across a cut at `relu`
        c = torch.cat([r, self.b(s)], dim=1)
        h = torch.relu(self.mix(c))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def test_residual_and_concat_model_gets_exits():
    model = ResCat()
    net = eenn.attach_exits(model, at=["relu", "cat"], num_classes=10, input_shape=(3, 16, 16))
    assert net.num_exits == 3
    assert [s.shape for s in net.backbone.stage_info] == [(8, 16, 16), (16, 16, 16), (10,)]
    x = torch.randn(4, 3, 16, 16)
    model.eval(), net.eval()
    with torch.no_grad():
        out = net(x)
        assert out.logits.shape == (3, 4, 10)
        assert torch.allclose(out.logits[-1], model(x), atol=1e-6)
        # the first segment carries the residual input along with the head's feature
        state, _, _ = net.forward_segment(0, x)
        assert isinstance(state, tuple) and len(state) == 2
    net.train()
    out = net(x)
    sum(F.cross_entropy(lg, torch.zeros(4, dtype=torch.long)) for lg in out.logits).backward()
    assert all(p.grad is not None for p in net.parameters())
    cost = net.cost()
    assert all(a < b for a, b in zip(cost.macs, cost.macs[1:]))
    from eenn.cost import count_macs

    assert cost.macs[-1] == count_macs(model, torch.zeros(1, 3, 16, 16))


def test_module_qualified_names_work_as_cut_points():
    net = eenn.attach_exits(ResCat(), at=["stem.2", "mix"], input_shape=(3, 8, 8))
    assert [s.name for s in net.backbone.stage_info][:2] == ["stem_2", "mix"]
    one = eenn.attach_exits(ResCat(), at="stem", input_shape=(3, 8, 8))  # one name: one cut
    assert one.num_exits == 2 and one.backbone.stage_info[0].name == "stem_2"
    with pytest.raises(TypeError, match="at must be a node or module name or a list of them, got 3"):
        eenn.attach_exits(ResCat(), at=3, input_shape=(3, 8, 8))


def test_wrong_node_name_lists_valid_ones():
    with pytest.raises(eenn.TraceError,
                       match=r"no node or module named 'cats'.*Did you mean 'cat'.*Node names: .*stem_0"):
        eenn.attach_exits(ResCat(), at=["cats"], input_shape=(3, 8, 8))


class Block(nn.Module):
    """A residual block: fx inlines it, so no node is named after it."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


class Staged(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), Block(16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        h = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def _randomize_bn(model):
    """Non-trivial BatchNorm statistics, so that eval-mode outputs depend on them."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_container_names_cut_at_the_modules_output():
    from eenn.backbones import head_input
    from eenn.engine import DynamicEngine

    torch.manual_seed(0)
    model = _randomize_bn(Staged())
    net = eenn.attach_exits(model, at=["stem", "layer1"], num_classes=10, input_shape=(3, 16, 16)).eval()
    # the cut is the node each container returns: its last (`relu_1` is torch.relu in layer1.1)
    assert [s.name for s in net.backbone.stage_info] == ["stem_2", "relu_1", "output"]
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        stem, layer1, final = model.stem(x), model.layer1(model.stem(x)), model(x)
        state, lg0, _ = net.forward_segment(0, x)
        assert torch.equal(head_input(state), stem)  # the exit reads exactly the stem's output
        assert torch.equal(lg0, net.heads[0](stem)[0])
        state, lg1, _ = net.forward_segment(1, state)
        assert torch.equal(head_input(state), layer1)
        out = net(x)
        assert torch.equal(out.logits[0], lg0) and torch.equal(out.logits[1], lg1)
        assert torch.allclose(out.logits[-1], final, atol=1e-6)
        never = DynamicEngine(net, "max_prob", [2.0, 2.0])(x)  # no probability reaches 2: all go to the end
        assert (never.exit == 2).all() and torch.equal(never.prediction, final.argmax(1))
        first = DynamicEngine(net, "max_prob", [0.0, 0.0])(x)  # every sample leaves at the stem's exit
        assert (first.exit == 0).all() and torch.equal(first.prediction, lg0.argmax(1))
    # the description stores node names: rebuilding on a fresh model cuts at the same places
    again = eenn.MultiExitNetwork.from_config(net.config, model=Staged())
    assert [s.name for s in again.backbone.stage_info] == ["stem_2", "relu_1", "output"]


def test_nested_container_name_cuts_after_that_block():
    torch.manual_seed(0)
    model = _randomize_bn(Staged())
    net = eenn.attach_exits(model, at=["layer1.0", "layer2.2"], input_shape=(3, 16, 16)).eval()
    assert [s.name for s in net.backbone.stage_info][:2] == ["relu", "relu_2"]
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        state, _, _ = net.forward_segment(0, x)
        assert torch.equal(state, model.layer1[0](model.stem(x)))
        assert torch.allclose(net(x).logits[-1], model(x), atol=1e-6)


def test_wrong_name_lists_node_and_module_names():
    with pytest.raises(eenn.TraceError) as err:
        eenn.attach_exits(Staged(), at=["layer1.2"], input_shape=(3, 16, 16))
    msg = str(err.value)
    assert "no node or module named 'layer1.2'" in msg and "Did you mean" in msg and "'layer1.0'" in msg
    assert re.search(r"Node names: .*\blayer1_0_conv\b", msg)  # a node name
    assert re.search(r"Module names.*: .*\blayer1\.0\b", msg)  # a container's module name
    # a leaf's dotted name is not listed a second time beside its node
    assert not re.search(r"Module names.*: .*layer1\.0\.conv", msg)


def test_module_called_twice_lists_its_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.fc = Block(4), nn.Linear(4, 3)

        def forward(self, x):
            h = self.block(self.block(x))
            return self.fc(h.mean((2, 3)))

    with pytest.raises(eenn.TraceError,
                       match=r"module 'block' is called 2 times; name one call's node instead: relu, relu_1"):
        eenn.attach_exits(Twice(), at=["block"], input_shape=(4, 8, 8))
    net = eenn.attach_exits(Twice(), at=["relu"], input_shape=(4, 8, 8))
    assert net.num_exits == 2


def test_module_inside_a_leaf_module_is_explained():
    with pytest.raises(eenn.TraceError, match=r"'layer1.0.conv' is never called.*inside 'layer1.0'.*leaf"):
        eenn.attach_exits(Staged(), at=["layer1.0.conv"], input_shape=(3, 16, 16), leaf_modules=[Block])
    net = eenn.attach_exits(Staged(), at=["layer1.0"], input_shape=(3, 16, 16), leaf_modules=[Block])
    assert net.backbone.stage_info[0].name == "layer1_0"


def test_two_names_of_one_cut_are_refused():
    with pytest.raises(eenn.TraceError, match=r"must be distinct.*'stem' -> stem_2"):
        eenn.attach_exits(Staged(), at=["stem", "stem_2"], input_shape=(3, 16, 16))


def test_untraceable_model_says_why():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                x = x * 2
            return self.fc(x)

    with pytest.raises(eenn.TraceError, match="cannot trace Branchy.*leaf_modules"):
        eenn.attach_exits(Branchy(), at=["fc"], input_shape=(4,))


def test_leaf_modules_keep_untraceable_parts_whole():
    class Gate(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.g, self.l2 = nn.Linear(4, 8), Gate(), nn.Linear(8, 3)

        def forward(self, x):
            return self.l2(self.g(torch.relu(self.l1(x))))

    model = Net().eval()
    net = eenn.attach_exits(model, at=["g"], input_shape=(4,), leaf_modules=[Gate]).eval()
    x = torch.randn(5, 4)
    assert torch.allclose(net(x).logits[-1], model(x))


def test_sizes_cross_a_cut_and_follow_compaction():
    """The batch size read before a cut is read again after it, from the compacted state."""
    from eenn.engine import DynamicEngine

    class Sizes(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(2 * 8 * 8, 3)

        def forward(self, x):
            n = x.size(0)
            h = torch.relu(self.conv(x))
            return self.fc(h.reshape(n, -1))

    torch.manual_seed(0)
    model = Sizes().eval()
    net = eenn.attach_exits(model, at=["relu"], input_shape=(1, 8, 8)).eval()
    x = torch.randn(7, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(net(x).logits[-1], model(x), atol=1e-6)
        state, _, _ = net.forward_segment(0, x)
        assert isinstance(state, Tensor)  # the size is not carried: segment 1 reads it from the state
        lg0 = net(x).logits[0]
        th = lg0.softmax(1).max(1).values.median()  # some samples leave, the rest run on compacted
        res = DynamicEngine(net, "max_prob", [float(th)])(x)
        assert 0 < int((res.exit == 0).sum()) < 7
        late = res.exit == 1
        assert torch.equal(res.prediction[late], model(x[late]).argmax(1))


def test_value_whose_shape_depends_on_the_batch_elsewhere_is_refused():
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            t = x.t()  # [4, B]: the batch in the second dimension
            h = torch.relu(self.a(x))
            return self.fc(h + t.t())

    with pytest.raises(eenn.TraceError, match=r"would carry 't' \(a tensor of shape \(4, 3\)\).*first dimension"):
        eenn.attach_exits(Transposed(), at=["relu"], input_shape=(4,))


def test_output_and_class_checks():
    with pytest.raises(eenn.TraceError, match="num_classes=5 but the model returns 10"):
        eenn.attach_exits(ResCat(), at=["cat"], input_shape=(3, 8, 8), num_classes=5)
    with pytest.raises(eenn.TraceError, match="Check input_shape"):
        eenn.attach_exits(ResCat(), at=["cat"], input_shape=(1, 8, 8))
    with pytest.raises(eenn.TraceError, match="at least one cut"):
        eenn.attach_exits(ResCat(), at=[], input_shape=(3, 8, 8))


def test_engine_on_tuple_states_in_pieces_and_one_by_one():
    """Compaction, micro-batches and the batch-1 path carry every value alive across a cut."""
    from eenn.engine import DynamicEngine
    from eenn.outputs import CachedOutputs
    from eenn.policies import decide, policy_scores

    torch.manual_seed(0)
    net = eenn.attach_exits(ResCat(), at=["relu", "cat"], num_classes=10, input_shape=(3, 16, 16)).eval()
    x = torch.randn(40, 3, 16, 16)
    with torch.no_grad():
        out = net(x)
    cache = CachedOutputs(out.logits, None, torch.zeros(40, dtype=torch.long))
    sc = policy_scores("max_prob", cache).score[:-1].sort(1).values
    th = (sc[:, 19] + sc[:, 20]) / 2  # about half leave at each early exit, no score on a threshold
    sim = decide("max_prob", cache, th)
    for eng in (DynamicEngine(net, "max_prob", th), DynamicEngine(net, "max_prob", th, micro_batch=6)):
        res = eng(x)
        assert torch.equal(res.exit, sim.exit) and torch.equal(res.prediction, sim.prediction)
    ones = [DynamicEngine(net, "max_prob", th)(x[i:i + 1]) for i in range(10)]
    assert torch.equal(torch.cat([o.exit for o in ones]), sim.exit[:10])
    assert 0 < (sim.exit < 2).sum() < 40
