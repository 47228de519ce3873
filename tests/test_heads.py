import pytest
import torch

import eenn
from eenn.heads import MixedPool2d

SHAPES = [(16, 8, 8), (32, 1, 1), (64,)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", eenn.list_heads())
def test_head_outputs(name, shape):
    if name in ("conv", "nachos") and len(shape) == 1:
        with pytest.raises(ValueError, match="feature map"):
            eenn.create_head(name, shape, 5)
        return
    head = eenn.create_head(name, shape, 5)
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
