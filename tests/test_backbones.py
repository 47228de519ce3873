"""The built-in backbone families: shapes per stage, stage counts, parameter counts, options."""
from __future__ import annotations

import functools
import inspect
import re

import pytest
import torch
import torch.nn.functional as F

from eenn.backbones import Backbone, create_backbone, head_input, list_backbones, register_backbone
from eenn.backbones.base import _BACKBONES

K = 10
INPUTS = [(1, 8), (1, 28), (3, 32)]  # (channels, size): sklearn digits, MNIST, CIFAR

NUM_STAGES = {
    "mlp": 3,
    "lenet5": 4,
    "alexnet": 5,
    "vgg11": 8,
    "vgg13": 10,
    "vgg16": 13,
    "resnet18": 8,
    "resnet34": 16,
    "resnet20": 9,
    "resnet32": 15,
    "resnet56": 27,
    "resnet110": 54,
    "mobilenetv2": 17,
    "vit": 6,
    "msdnet": 4,
}

# Exact counts for a 3x32x32 input, 10 classes, width 1 (default options), to catch drift.
PARAMS = {
    "mlp": 829_386,  # 3072-256-128-64-10 with BN
    "lenet5": 83_126,  # 'same' conv1, so fc1 sees 16x6x6 (the classic unpadded LeNet: ~62k)
    "alexnet": 4_554_058,  # CIFAR AlexNet, 512-unit hidden layer
    "vgg11": 9_228_362,  # reference: VGG11-BN CIFAR ~9.2M
    "vgg13": 9_413_066,  # reference: VGG13-BN CIFAR ~9.4M
    "vgg16": 14_724_042,  # reference: VGG16-BN CIFAR ~14.7M
    "resnet18": 11_173_962,  # reference: CIFAR ResNet-18 11.17M
    "resnet34": 21_282_122,  # reference: CIFAR ResNet-34 21.3M
    "resnet20": 269_722,  # reference (He et al. 2016, option A): 0.27M
    "resnet32": 464_154,  # reference: 0.46M
    "resnet56": 853_018,  # reference: 0.85M
    "resnet110": 1_727_962,  # reference: 1.7M
    "mobilenetv2": 2_236_682,  # reference: MobileNetV2 with 10 classes ~2.24M
    "vit": 208_970,  # 4x4 patches, width 64, 6 blocks (33,472 each), MLP ratio 2, class token, 65 positions
    "msdnet": 533_622,  # 4 blocks of 4, 2, 2, 2 layers on 3 scales (ours; no published CIFAR count at this depth)
}
HE_RESNETS = ["resnet20", "resnet32", "resnet56", "resnet110"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@functools.cache
def _built(name: str, channels: int, size: int) -> Backbone:
    torch.manual_seed(0)
    return create_backbone(name, in_channels=channels, num_classes=K, input_size=size)


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _check_stage_shapes(net: Backbone, x: torch.Tensor) -> None:
    """Running stage by stage gives exactly the shapes that stage_info promises."""
    net.eval()
    with torch.no_grad():
        state = x
        for stage, info in zip(net.stages, net.stage_info):
            state = stage(state)
            assert tuple(head_input(state).shape) == (x.shape[0], *info.shape), info.name
        assert net.classifier(head_input(state)).shape == (x.shape[0], K)


def test_every_family_is_registered_with_keyword_only_builder():
    assert set(NUM_STAGES) <= set(list_backbones())
    for name in NUM_STAGES:
        params = inspect.signature(_BACKBONES.get(name)).parameters.values()
        assert all(p.kind is p.KEYWORD_ONLY for p in params), name


@pytest.mark.parametrize("channels,size", INPUTS, ids=[f"{c}x{s}x{s}" for c, s in INPUTS])
@pytest.mark.parametrize("name", list_backbones())
def test_shapes(name, channels, size):
    net = _built(name, channels, size)
    x = torch.randn(2, channels, size, size)
    assert net.input_shape == (channels, size, size)
    assert net.num_classes == K
    if name in NUM_STAGES:
        assert net.num_stages == NUM_STAGES[name]
    names = [info.name for info in net.stage_info]
    assert len(set(names)) == len(names) and all(names)

    _check_stage_shapes(net, x)
    net.eval()
    with torch.no_grad():
        feats = net.forward_intermediates(x)
        logits = net(x)
    assert len(feats) == net.num_stages
    assert [tuple(f.shape[1:]) for f in feats] == [info.shape for info in net.stage_info]
    assert logits.shape == (2, K)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list_backbones())
def test_train_step_reaches_every_parameter(name):
    net = create_backbone(name, in_channels=1, num_classes=K, input_size=8)
    net.train()
    loss = F.cross_entropy(net(torch.randn(2, 1, 8, 8)), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    assert not unused


@pytest.mark.parametrize("name", list_backbones())
def test_non_square_input(name):
    net = create_backbone(name, in_channels=2, num_classes=K, input_size=(4, 30))
    _check_stage_shapes(net, torch.randn(2, 2, 4, 30))


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count(name):
    assert _count(_built(name, 3, 32)) == PARAMS[name]


@pytest.mark.parametrize("name", list_backbones())
def test_half_width_is_smaller(name):
    half = create_backbone(name, in_channels=1, num_classes=K, input_size=8, width=0.5)
    assert _count(half) < _count(_built(name, 1, 8))
    _check_stage_shapes(half, torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("name", HE_RESNETS)
def test_projection_shortcut_adds_parameters(name):
    b = create_backbone(name, in_channels=3, num_classes=K, input_size=32, shortcut="B")
    # Option B adds a 1x1 conv + BN at the two downsampling blocks: 16*32+64 and 32*64+128.
    assert _count(b) - PARAMS[name] == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    _check_stage_shapes(b, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize(
    "name,options",
    [("alexnet", {"batch_norm": True}), ("vgg11", {"hidden": 256}), ("lenet5", {"width": 2.0})],
)
def test_options_that_add_parameters(name, options):
    net = create_backbone(name, in_channels=3, num_classes=K, input_size=32, **options)
    assert _count(net) > PARAMS[name]
    _check_stage_shapes(net, torch.randn(2, 3, 32, 32))


def test_small_options():
    net = create_backbone("mlp", in_channels=1, num_classes=3, input_size=8, hidden=(32, 16))
    assert [i.shape for i in net.stage_info] == [(32,), (16,)]
    net = create_backbone("mobilenetv2", in_channels=3, num_classes=K, input_size=32, dropout=0.0)
    assert _count(net) == PARAMS["mobilenetv2"]


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="bogus"):
        create_backbone("resnet20", in_channels=3, num_classes=K, input_size=32, bogus=1)


@pytest.mark.parametrize("options", [{"shortcut": "C"}, {"width": 0.0}])
def test_bad_option_value(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        create_backbone("resnet20", in_channels=3, num_classes=K, input_size=32, **options)


def test_unknown_name_lists_available():
    with pytest.raises(KeyError, match="resnet20") as err:
        create_backbone("resnet21", in_channels=3, num_classes=K, input_size=32)
    assert "mobilenetv2" in str(err.value)


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet20")(lambda **kw: None)


def test_resnet_cifar_per_group_depths_and_channels():
    # Defaults are ResNet-20 exactly.
    assert _count(create_backbone("resnet_cifar", in_channels=3, num_classes=K, input_size=32)) == PARAMS["resnet20"]
    net = create_backbone("resnet_cifar", in_channels=1, num_classes=K, input_size=8, depths=[2, 1], channels=[4, 12])
    assert net.num_stages == 3 and [i.shape for i in net.stage_info] == [(4, 8, 8), (4, 8, 8), (12, 4, 4)]
    # fewer channels in a later group: option A cannot drop channels, so that block projects
    net = create_backbone("resnet_cifar", in_channels=1, num_classes=K, input_size=8, depths=[1, 1], channels=[16, 8])
    _check_stage_shapes(net, torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="one entry per group"):
        create_backbone("resnet_cifar", in_channels=1, num_classes=K, input_size=8, depths=[1, 1], channels=[8])


def test_mobilenetv2_settings_kernel_and_last_channels():
    net = create_backbone("mobilenetv2", in_channels=1, num_classes=K, input_size=8, stem_channels=8,
                          settings=[(1, 8, 1, 1), (4, 16, 2, 2, 5)], last_channels=32)
    assert net.num_stages == 3 and net.stage_info[-1].shape == (32, 4, 4)
    assert net.stages[1].block[1][0].kernel_size == (5, 5)
    _check_stage_shapes(net, torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="odd kernel size"):
        create_backbone("mobilenetv2", in_channels=1, num_classes=K, input_size=8, settings=[(1, 8, 1, 1, 4)])


def test_vit_blocks_are_stages_of_token_states_and_attention_is_counted():
    """Each encoder block is a stage of (tokens, width) states; a block's MACs are its linear
    layers plus attention (Q K^T and A V), which the fused CPU kernel would otherwise hide."""
    import eenn
    from eenn.cost import profile_stages

    grey = create_backbone("vit", in_channels=1, num_classes=K, input_size=28)
    assert [s.shape for s in grey.stage_info] == [(50, 64)] * 6  # class token + 7x7 patches
    rgb = create_backbone("vit", in_channels=3, num_classes=K, input_size=32, depth=4, dim=48, heads=3)
    assert [s.shape for s in rgb.stage_info] == [(65, 48)] * 4
    macs, head = profile_stages(grey.stages, grey.classifier, grey.input_shape)
    block = 50 * (4 * 64 * 64 + 2 * 64 * 128) + 2 * 50 * 50 * 64
    assert macs[1:] == [block] * 5 and macs[0] == block + 49 * 16 * 64 and head == 64 * K
    # placement by cost spreads the exits over the blocks as on a CNN
    net = eenn.create_network("vit", in_channels=1, num_classes=K, input_size=28, exits="linear:2")
    assert net.exit_stages == [1, 3]
    with pytest.raises(ValueError, match="patch_size 5 must divide"):
        create_backbone("vit", in_channels=1, num_classes=K, input_size=28, patch_size=5)
    with pytest.raises(ValueError, match="multiple of the head count"):
        create_backbone("vit", in_channels=1, num_classes=K, input_size=28, dim=30, heads=4, width=1.0)


@pytest.mark.parametrize("name, options, message", [
    ("mlp", {"width": "abc"}, "backbone 'mlp': option 'width' must be a number, got 'abc'"),
    ("mlp", {"hidden": [32, "x"]}, "option 'hidden' must be a list of ints"),
    ("mlp", {"hidden": [32, -3]}, "option 'hidden' must be >= 1"),
    ("vit", {"class_token": "no"}, "option 'class_token' must be true or false"),
    ("vgg11", {"hidden": 1.5}, "option 'hidden' must be an int or None"),
    ("alexnet", {"dropout": 1.5}, "option 'dropout' must lie in"),
])
def test_option_types_and_sizes_are_named(name, options, message):
    # a wrong type is a TypeError that is also a ValueError (what the CLI reports as a bad option)
    with pytest.raises((TypeError, ValueError), match=message):
        create_backbone(name, in_channels=1, num_classes=K, input_size=8, **options)


@pytest.mark.parametrize("arg, value", [("in_channels", "1"), ("num_classes", "10"), ("num_classes", 1),
                                        ("input_size", "28"), ("input_size", (8, 0)), ("input_size", True)])
def test_common_arguments_are_checked(arg, value):
    kw = {"in_channels": 1, "num_classes": K, "input_size": 8, arg: value}
    with pytest.raises(ValueError, match=f"{arg} must be .*got {re.escape(repr(value))}"):
        create_backbone("mlp", **kw)
