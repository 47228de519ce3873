"""VGG-11/13/16 with BatchNorm, CIFAR style (global-average-pool head). One stage per conv."""
from __future__ import annotations

from torch import nn

from ._layers import check_dropout, check_size, check_width, conv_bn_act, init_weights, max_pool2, scaled
from .base import Backbone, register_backbone

__all__ = ["vgg11", "vgg13", "vgg16"]

# Convs per block; block b has 64 * 2**b channels (capped at 512) and ends with a 2x2 max pool.
_CONFIGS = {
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
}


def _vgg(
    depths: tuple[int, ...],
    *,
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    width: float,
    hidden: int | None,
    dropout: float,
) -> Backbone:
    check_width(width)
    check_size("vgg", "hidden", hidden)
    check_dropout("vgg", dropout)
    stages: list[nn.Module] = []
    names: list[str] = []
    in_ch, size = in_channels, tuple(input_size)
    for b, depth in enumerate(depths):
        out_ch = scaled(min(64 * 2**b, 512), width)
        for i in range(depth):
            layers = list(conv_bn_act(in_ch, out_ch, 3))
            if i == depth - 1:  # the block's pool belongs to its last conv's stage
                pool, size = max_pool2(size)
                layers += pool
            stages.append(nn.Sequential(*layers))
            names.append(f"conv{b + 1}_{i + 1}")
            in_ch = out_ch

    head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if hidden is not None:
        head += [nn.Linear(in_ch, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        in_ch = hidden
    head.append(nn.Linear(in_ch, num_classes))
    init_weights(stages)
    return Backbone(stages, nn.Sequential(*head), input_shape=(in_channels, *input_size), stage_names=names)


@register_backbone("vgg11")
def vgg11(
    *, in_channels: int, num_classes: int, input_size: tuple[int, int],
    width: float = 1.0, hidden: int | None = None, dropout: float = 0.5,
) -> Backbone:
    """VGG-11-BN (8 conv stages)."""
    return _vgg(_CONFIGS["vgg11"], **locals())


@register_backbone("vgg13")
def vgg13(
    *, in_channels: int, num_classes: int, input_size: tuple[int, int],
    width: float = 1.0, hidden: int | None = None, dropout: float = 0.5,
) -> Backbone:
    """VGG-13-BN (10 conv stages)."""
    return _vgg(_CONFIGS["vgg13"], **locals())


@register_backbone("vgg16")
def vgg16(
    *, in_channels: int, num_classes: int, input_size: tuple[int, int],
    width: float = 1.0, hidden: int | None = None, dropout: float = 0.5,
) -> Backbone:
    """VGG-16-BN (13 conv stages)."""
    return _vgg(_CONFIGS["vgg16"], **locals())
