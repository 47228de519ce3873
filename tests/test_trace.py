"""attach_exits on user models the library does not ship."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

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


def test_wrong_node_name_lists_valid_ones():
    with pytest.raises(eenn.TraceError, match=r"no node named 'cats'.*Did you mean 'cat'.*Valid names: .*stem_0"):
        eenn.attach_exits(ResCat(), at=["cats"], input_shape=(3, 8, 8))


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


def test_non_tensor_value_across_a_cut_is_refused():
    class Sizes(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(2 * 8 * 8, 3)

        def forward(self, x):
            n = x.size(0)
            h = torch.relu(self.conv(x))
            return self.fc(h.reshape(n, -1))

    with pytest.raises(eenn.TraceError, match="only tensors with a leading batch dimension"):
        eenn.attach_exits(Sizes(), at=["relu"], input_shape=(1, 8, 8))


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
    from eenn.evaluate import CachedOutputs
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
