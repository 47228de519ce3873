"""CIFAR-style ResNets: ResNet-18/34 (64-512 channels, projection shortcuts) and the He et al.
(2016) CIFAR family ResNet-20/32/56/110 (16-64 channels) used by EENets, and ``resnet_cifar``
with free per-group depths and channels (for the design search). The stem is merged
into the first block's stage; after that every BasicBlock is one stage."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ._layers import avgpool_linear, check_width, conv_bn_act, init_weights, scaled
from .base import Backbone, register_backbone

__all__ = ["resnet18", "resnet34", "resnet20", "resnet32", "resnet56", "resnet110", "resnet_cifar"]


class ZeroPadShortcut(nn.Module):
    """Option A of He et al.: subsample by striding and append zero channels (no parameters)."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels, self.stride = extra_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        # Same output size as the 3x3/pad-1 conv of the residual branch: ceil(n / stride).
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut; ReLU after the addition."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = conv_bn_act(in_ch, out_ch, 3, stride)
        self.conv2 = conv_bn_act(out_ch, out_ch, 3, act=None)
        self.shortcut: nn.Module
        if stride == 1 and in_ch == out_ch:
            self.shortcut = nn.Identity()
        elif shortcut == "A" and out_ch >= in_ch:  # zero padding cannot drop channels: project then
            self.shortcut = ZeroPadShortcut(out_ch - in_ch, stride)
        else:
            self.shortcut = conv_bn_act(in_ch, out_ch, 1, stride, act=None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


def _resnet(
    depths: Sequence[int],
    channels: Sequence[int],
    *,
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    width: float,
    shortcut: str,
) -> Backbone:
    check_width(width)
    depths, channels = [int(d) for d in depths], [int(c) for c in channels]
    if not depths or len(depths) != len(channels):
        raise ValueError(f"depths and channels need one entry per group, got {len(depths)} and {len(channels)}")
    if min(depths) < 1 or min(channels) < 1:
        raise ValueError(f"every group needs depths >= 1 and channels >= 1, got depths={depths}, channels={channels}")
    if shortcut not in ("A", "B"):
        raise ValueError(f"shortcut must be 'A' (zero padding) or 'B' (projection), got {shortcut!r}")
    # The floor of 8 channels keeps thin variants usable; narrower groups asked for explicitly stay.
    widths = [scaled(c, width, minimum=min(8, c)) for c in channels]
    stem = conv_bn_act(in_channels, widths[0], 3)
    stages: list[nn.Module] = []
    names: list[str] = []
    in_ch = widths[0]
    for g, (depth, out_ch) in enumerate(zip(depths, widths)):
        for i in range(depth):
            stride = 2 if g > 0 and i == 0 else 1
            block = BasicBlock(in_ch, out_ch, stride, shortcut)
            # The stem alone is too shallow to be worth an exit, so it shares the first stage.
            stages.append(nn.Sequential(stem, block) if not stages else block)
            names.append(f"block{g + 1}.{i}")
            in_ch = out_ch
    init_weights(stages)
    return Backbone(
        stages,
        avgpool_linear(in_ch, num_classes),
        input_shape=(in_channels, *input_size),
        stage_names=names,
    )


_WIDE = (64, 128, 256, 512)  # ResNet-18/34
_CIFAR = (16, 32, 64)  # ResNet-20/32/56/110: depth = 6n + 2


@register_backbone("resnet18")
def resnet18(*, in_channels: int, num_classes: int, input_size: tuple[int, int], width: float = 1.0) -> Backbone:
    """ResNet-18, CIFAR stem (3x3 conv, no max pool); 8 stages."""
    return _resnet((2, 2, 2, 2), _WIDE, shortcut="B", **locals())


@register_backbone("resnet34")
def resnet34(*, in_channels: int, num_classes: int, input_size: tuple[int, int], width: float = 1.0) -> Backbone:
    """ResNet-34, CIFAR stem (3x3 conv, no max pool); 16 stages."""
    return _resnet((3, 4, 6, 3), _WIDE, shortcut="B", **locals())


@register_backbone("resnet20")
def resnet20(
    *, in_channels: int, num_classes: int, input_size: tuple[int, int], width: float = 1.0, shortcut: str = "A"
) -> Backbone:
    """ResNet-20 (He et al. 2016, n=3); 9 stages."""
    return _resnet((3, 3, 3), _CIFAR, **locals())


@register_backbone("resnet32")
def resnet32(
    *, in_channels: int, num_classes: int, input_size: tuple[int, int], width: float = 1.0, shortcut: str = "A"
) -> Backbone:
    """ResNet-32 (He et al. 2016, n=5); 15 stages."""
    return _resnet((5, 5, 5), _CIFAR, **locals())


@register_backbone("resnet56")
def resnet56(
    *, in_channels: int, num_classes: int, input_size: tuple[int, int], width: float = 1.0, shortcut: str = "A"
) -> Backbone:
    """ResNet-56 (He et al. 2016, n=9); 27 stages."""
    return _resnet((9, 9, 9), _CIFAR, **locals())


@register_backbone("resnet110")
def resnet110(
    *, in_channels: int, num_classes: int, input_size: tuple[int, int], width: float = 1.0, shortcut: str = "A"
) -> Backbone:
    """ResNet-110 (He et al. 2016, n=18); 54 stages."""
    return _resnet((18, 18, 18), _CIFAR, **locals())


@register_backbone("resnet_cifar")
def resnet_cifar(
    *,
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    depths: Sequence[int] = (3, 3, 3),
    channels: Sequence[int] = (16, 32, 64),
    width: float = 1.0,
    shortcut: str = "A",
) -> Backbone:
    """A CIFAR ResNet with any number of groups, ``depths[g]`` BasicBlocks of ``channels[g]``
    channels in group ``g`` (each group after the first halves the map). The defaults are
    ResNet-20; this is the family the design search varies per stage."""
    return _resnet(depths, channels, in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                   width=width, shortcut=shortcut)
