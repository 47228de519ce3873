import pytest
import torch

import eenn
from eenn.heads import MixedPool2d

SHAPES = [(16, 8, 8), (32, 1, 1), (64,), (17, 8)]  # feature map, 1x1 map, flat, tokens (class token + 4x4)
TOKEN_HEADS = ("token", "lgvit_local", "lgvit_global")


def _backbone_reading(shape):
    """A one-stage backbone whose classifier reads features of ``shape`` (for heads built from a
    backbone, ``replica``; the others do not take it)."""
    from eenn.backbones.base import Backbone
    from eenn.heads import TokenPool

    pool = {3: [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()], 2: [TokenPool(shape[-1], 0)], 1: []}[len(shape)]
    dim = shape[0] if len(shape) != 2 else shape[1]
    return Backbone([torch.nn.Identity()], torch.nn.Sequential(*pool, torch.nn.Linear(dim, 5)), input_shape=shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", eenn.list_heads())
def test_head_outputs(name, shape):
    if name in ("conv", "nachos", "msdnet") and len(shape) != 3:
        with pytest.raises(ValueError, match="feature map.*use head") as err:
            eenn.create_head(name, shape, 5)
        assert ("token" in str(err.value)) == (len(shape) == 2)
        return
    if name in TOKEN_HEADS and len(shape) != 2:
        with pytest.raises(ValueError, match="reads token states"):
            eenn.create_head(name, shape, 5)
        return
    head = eenn.create_head(name, shape, 5, backbone=_backbone_reading(shape))
    logits, gate = head(torch.randn(3, *shape))
    assert logits.shape == (3, 5)
    gated = name in ("branching", "eenets", "nachos")
    assert head.has_gate == gated
    if gated:
        assert gate.shape == (3,) and ((gate >= 0) & (gate <= 1)).all()
    else:
        assert gate is None


@pytest.mark.parametrize("name", ["linear", "conv", "sdn"])
def test_any_head_can_emit_a_gate_and_width_is_configurable(name):
    narrow = eenn.create_head(name, (16, 8, 8), 5, width=8)
    wide = eenn.create_head(name, (16, 8, 8), 5, width=64, gate=True)
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in wide.parameters())
    assert wide(torch.randn(2, 16, 8, 8))[1].shape == (2,)


def test_sdn_mixed_pooling_is_a_learnable_mix():
    pool = MixedPool2d(2)
    x = torch.randn(1, 2, 4, 4)
    pool.alpha.data.fill_(1.0)
    assert torch.equal(pool(x), torch.nn.functional.max_pool2d(x, 2))
    pool.alpha.data.fill_(0.0)
    assert torch.allclose(pool(x), torch.nn.functional.avg_pool2d(x, 2))
    head = eenn.create_head("sdn", (16, 16, 16), 5)
    assert any(isinstance(m, MixedPool2d) and m.kernel_size == 4 for m in head.modules())
    assert not any(isinstance(m, MixedPool2d) for m in eenn.create_head("sdn", (16, 3, 3), 5).modules())


def test_head_registry_errors():
    with pytest.raises(KeyError, match="unknown exit head 'lineer'.*did you mean 'linear'"):
        eenn.create_head("lineer", (4,), 2)
    # the closest names first, the longest shared beginning ahead: a typo of resnet20 is not sent to resnet32
    with pytest.raises(KeyError, match="unknown backbone 'resnet21'.*did you mean 'resnet20' or 'resnet32'"):
        eenn.create_network("resnet21", in_channels=1, num_classes=10, input_size=8)
    with pytest.raises(ValueError, match="does not accept option.*'depth'.*it accepts"):
        eenn.create_head("linear", (4,), 2, depth=3)
    with pytest.raises(ValueError, match="already registered"):
        eenn.register_head("linear")(lambda in_shape, num_classes: None)


def test_mixed_gated_and_plain_heads_are_refused():
    with pytest.raises(ValueError, match="every exit head emits a gate or none"):
        eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[1, 2], head=["linear", "branching"])


@pytest.mark.parametrize("name", ["linear", "sdn", "branching"])
def test_cascade_is_a_head_option(name):
    plain = eenn.create_head(name, (16, 8, 8), 5)
    head = eenn.create_head(name, (16, 8, 8), 5, cascade=True)
    assert not plain.cascades and head.cascades
    assert head.classifier.in_features == plain.classifier.in_features + 5
    x, prev = torch.randn(3, 16, 8, 8), torch.randn(3, 5, requires_grad=True)
    with pytest.raises(ValueError, match="needs the previous exit's logits"):
        head(x)
    logits, gate = head(x, prev)
    assert logits.shape == (3, 5) and (gate is None) == (name != "branching")
    assert not torch.equal(head(x, prev * 3)[0], logits)  # it reads its predecessor's logits...
    logits.sum().backward()
    assert prev.grad is None  # ...detached


def test_first_exit_never_cascades_and_the_option_is_kept_as_given():
    net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, exits=[1, 3],
                              head="linear", head_options={"cascade": True})
    assert [h.cascades for h in net.heads] == [False, True]
    assert [o["cascade"] for o in net.head_options] == [True, True]  # what a checkpoint stores
    again = eenn.MultiExitNetwork.from_config(net.config)
    assert [h.cascades for h in again.heads] == [False, True]
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


def test_token_heads_read_what_they_say():
    """The class-token head depends on token 0 only; the mean head on every token; the local
    head on the patch grid only (the class token left out); the global head on every token."""
    torch.manual_seed(0)
    x = torch.randn(2, 17, 8)
    moved = x.clone()
    moved[:, 1:] += torch.randn(2, 16, 8)  # every patch token changes, the class token does not
    cls_only = x.clone()
    cls_only[:, 0] += torch.randn(2, 8)  # (not a constant: LayerNorm would remove it)
    heads = {n: eenn.create_head(n, (17, 8), 5).eval() for n in ("token", "linear", "lgvit_local", "lgvit_global")}
    same = {n: torch.allclose(h(x)[0], h(moved)[0]) for n, h in heads.items()}
    assert same == {"token": True, "linear": False, "lgvit_local": False, "lgvit_global": False}
    assert torch.allclose(heads["lgvit_local"](x)[0], heads["lgvit_local"](cls_only)[0])
    assert not torch.allclose(heads["lgvit_global"](x)[0], heads["lgvit_global"](cls_only)[0])
    # A token index other than the class token, and DeeBERT's pooler.
    last = eenn.create_head("token", (17, 8), 5, index=-1, width=6).eval()
    changed_last = x.clone()
    changed_last[:, -1] += torch.randn(2, 8)
    assert not torch.allclose(last(x)[0], last(changed_last)[0])
    changed_first = x.clone()
    changed_first[:, :-1] += torch.randn(2, 16, 8)
    assert torch.allclose(last(x)[0], last(changed_first)[0])


def test_token_head_on_a_vit_without_class_token_asks_for_the_index():
    kw = dict(in_channels=1, num_classes=10, input_size=8, dim=16, depth=2, heads=2, class_token=False, exits="all")
    with pytest.raises(ValueError, match="no class token .* give index="):
        eenn.create_network("vit", head="token", **kw)
    assert eenn.create_network("vit", head="token", head_options={"index": 3}, **kw).num_exits == 2
    assert eenn.create_network("vit", head="token", **{**kw, "class_token": True}).num_exits == 2


def test_local_head_finds_the_grid_or_asks_for_it():
    from eenn.heads import token_grid

    assert token_grid(49) == (7, 7, False) and token_grid(50) == (7, 7, True) and token_grid(128) is None
    assert eenn.create_head("lgvit_local", (49, 8), 3)(torch.randn(2, 49, 8))[0].shape == (2, 3)
    with pytest.raises(ValueError, match="not a square patch grid.*grid="):
        eenn.create_head("lgvit_local", (24, 8), 3)
    rect = eenn.create_head("lgvit_local", (25, 8), 3, grid=(4, 6), class_token=True)
    assert rect(torch.randn(2, 25, 8))[0].shape == (2, 3)
    with pytest.raises(ValueError, match="does not fit 25 tokens"):
        eenn.create_head("lgvit_local", (25, 8), 3, grid=(4, 4))
    with pytest.raises(ValueError, match="outside the 17 tokens"):
        eenn.create_head("token", (17, 8), 3, index=17)


def test_attention_is_counted_on_every_path():
    """The flop counter misses the fused attention kernels of eval mode (SDPA's CPU kernel, the
    fast paths of nn.MultiheadAttention and nn.TransformerEncoderLayer); eenn's counter does not,
    so a block costs the same in training and in inference mode."""
    from eenn.cost import count_macs

    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    x = torch.randn(1, 10, 16)
    linear = 10 * (4 * 16 * 16 + 2 * 16 * 32)
    attention = 2 * 10 * 10 * 16
    assert count_macs(layer.eval(), x) == count_macs(layer.train(), x) == linear + attention
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    assert count_macs(lambda a: mha.eval()(a, a, a), x) == count_macs(lambda a: mha.train()(a, a, a), x) \
        == 10 * 4 * 16 * 16 + attention
    q = torch.randn(1, 2, 10, 8)
    assert count_macs(lambda a: torch.nn.functional.scaled_dot_product_attention(a, a, a), q) == 2 * 2 * 10 * 10 * 8


@pytest.mark.parametrize("name, options, message", [
    ("linear", {"width": -3}, "exit head 'linear': option 'width' must be >= 1 .or 0/None: no hidden layer., got -3"),
    ("linear", {"width": "wide"}, "option 'width' must be an int or None, got 'wide'"),
    ("conv", {"layers": 1.5}, "option 'layers' must be an int, got 1.5"),
    ("nachos", {"pool": 0}, "option 'pool' must be >= 1"),
])
def test_head_option_types_and_sizes_are_named(name, options, message):
    with pytest.raises((TypeError, ValueError), match=message):
        eenn.create_head(name, (16, 8, 8), 5, **options)
    assert eenn.create_head("linear", (16,), 5, width=0).feature_dim == 16  # 0: no hidden layer


@pytest.mark.parametrize("name,opts", [("alexnet", {"width": 0.25}), ("resnet20", {"width": 0.5}), ("mlp", {}),
                                       ("vit", {"patch_size": 7})])
def test_replica_heads_copy_the_backbones_classifier(name, opts, tmp_path):
    """AEP's exits: at every stage a copy of the backbone's own classifier (the same layers, not
    shared, freshly initialised) behind an adapter to the shape it reads; the network trains,
    saves and loads, and exports to ONNX with the engine's answers."""
    import numpy as np

    from eenn.exporter import StagedRunner, export

    torch.manual_seed(0)
    net = eenn.create_network(name, in_channels=1, num_classes=10, input_size=(28, 28), exits="all", head="replica",
                              **opts)
    clf = net.backbone.classifier
    layers = [type(m) for m in (clf if isinstance(clf, torch.nn.Sequential) else [clf])]
    mine = {id(p) for p in clf.parameters()}
    for head in net.heads:
        adapter, body = head.body
        assert [type(m) for m in body] + [type(head.classifier)] == layers  # the classifier's layers, in order
        assert not mine & {id(p) for p in head.parameters()}  # copies, not the classifier itself
    x = torch.randn(4, 1, 28, 28)
    out = net(x)
    assert out.logits.shape == (net.num_exits, 4, 10)
    sum(torch.nn.functional.cross_entropy(lg, torch.arange(4)) for lg in out.logits).backward()
    assert all(p.grad is not None for h in net.heads for p in h.parameters())
    net.eval()
    again = eenn.load(eenn.save(net, tmp_path / "r.safetensors")).eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, net(x).logits)
        policy = eenn.ExitPolicy("max_prob", [0.5] * (net.num_exits - 1))
        want = eenn.DynamicEngine(net, policy)(x)
    export(net, tmp_path / "onnx", policy=policy)
    got = StagedRunner(tmp_path / "onnx")(x.numpy())
    assert np.array_equal(got["prediction"], want.prediction.numpy())


def test_replica_head_needs_a_backbone_with_a_classifier_to_copy():
    with pytest.raises(ValueError, match="copies the backbone's own classifier: build it as part of a network"):
        eenn.create_head("replica", (8, 4, 4), 10)
    with pytest.raises(ValueError, match="'backbone' is not an option"):
        eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=8, head="replica",
                            head_options={"backbone": "resnet20"})

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.a(x)), 1))

    with pytest.raises(ValueError, match="classifier .* is not a nn.Linear or a nn.Sequential ending in one"):
        eenn.attach_exits(Net(), at=["a"], input_shape=(1, 8, 8), head="replica")
