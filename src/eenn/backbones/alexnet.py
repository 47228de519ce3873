"""AlexNet sized for CIFAR-like inputs, as in the BranchyNet and Scardapane et al. experiments."""
from __future__ import annotations

from math import prod

from torch import nn

from ._layers import check_dropout, check_size, check_width, conv_out, init_weights, max_pool2, scaled
from .base import Backbone, register_backbone

__all__ = ["alexnet"]

# (channels, kernel, followed by a 2x2 max pool) for conv1..conv5.
_CONVS = [(64, 5, True), (192, 5, True), (384, 3, False), (256, 3, False), (256, 3, True)]


@register_backbone("alexnet")
def alexnet(
    *,
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    width: float = 1.0,
    hidden: int | None = None,
    dropout: float = 0.5,
    batch_norm: bool = False,
) -> Backbone:
    """Five conv stages (conv + [BN] + ReLU [+ max pool]); the classifier is the two-layer MLP
    head with dropout (``hidden`` defaults to 512 * width)."""
    check_width(width)
    check_size("alexnet", "hidden", hidden)
    check_dropout("alexnet", dropout)
    stages: list[nn.Module] = []
    in_ch, size = in_channels, tuple(input_size)
    for out_ch, kernel, pool in _CONVS:
        out_ch = scaled(out_ch, width)
        # Without BN the conv needs its own bias; with BN the bias would be redundant.
        layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
        size = conv_out(size, kernel, padding=kernel // 2)
        if pool:
            pool_layers, size = max_pool2(size)
            layers += pool_layers
        stages.append(nn.Sequential(*layers))
        in_ch = out_ch

    hidden = scaled(512, width) if hidden is None else hidden
    classifier = nn.Sequential(
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(in_ch * prod(size), hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )
    init_weights(stages)
    return Backbone(
        stages,
        classifier,
        input_shape=(in_channels, *input_size),
        stage_names=[f"conv{i + 1}" for i in range(len(stages))],
    )
