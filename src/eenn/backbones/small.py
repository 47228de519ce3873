"""Small backbones for quick experiments and tiny inputs: an MLP and LeNet-5."""
from __future__ import annotations

from math import prod
from typing import Sequence

from torch import nn

from ._layers import check_size, check_width, conv_out, init_weights, max_pool2, scaled
from .base import Backbone, register_backbone

__all__ = ["mlp", "lenet5"]


@register_backbone("mlp")
def mlp(
    *,
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    width: float = 1.0,
    hidden: Sequence[int] = (256, 128, 64),
) -> Backbone:
    """Fully connected net on the flattened input; every hidden layer (Linear + BN + ReLU) is a
    stage, so exits see 1-D features."""
    check_width(width)
    check_size("mlp", "hidden", list(hidden))
    sizes = [scaled(h, width, minimum=min(8, h)) for h in hidden]
    if not sizes:
        raise ValueError("mlp needs at least one hidden layer")
    stages: list[nn.Module] = []
    features = in_channels * prod(input_size)
    for i, out in enumerate(sizes):
        layers = [nn.Flatten()] if i == 0 else []
        layers += [nn.Linear(features, out), nn.BatchNorm1d(out), nn.ReLU(inplace=True)]
        stages.append(nn.Sequential(*layers))
        features = out
    init_weights(stages)
    return Backbone(
        stages,
        nn.Linear(features, num_classes),
        input_shape=(in_channels, *input_size),
        stage_names=[f"fc{i + 1}" for i in range(len(stages))],
    )


@register_backbone("lenet5")
def lenet5(
    *,
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    width: float = 1.0,
) -> Backbone:
    """LeNet-5 with ReLU and max pooling: conv1, conv2, fc1, fc2 stages, then the classifier."""
    check_width(width)
    c1, c2 = scaled(6, width, minimum=2), scaled(16, width, minimum=2)
    f1, f2 = scaled(120, width), scaled(84, width)

    # conv1 keeps the size ('same' padding), as in the 28x28 MNIST variant.
    pool1, size = max_pool2(input_size)
    conv1 = nn.Sequential(nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(inplace=True), *pool1)
    # The classic unpadded conv2 (e.g. 14 -> 10) would shrink small maps to nothing.
    pad = tuple(0 if s >= 10 else 2 for s in size)
    size = conv_out(size, 5, padding=pad)
    pool2, size = max_pool2(size)
    conv2 = nn.Sequential(nn.Conv2d(c1, c2, 5, padding=pad), nn.ReLU(inplace=True), *pool2)

    fc1 = nn.Sequential(nn.Flatten(), nn.Linear(c2 * prod(size), f1), nn.ReLU(inplace=True))
    fc2 = nn.Sequential(nn.Linear(f1, f2), nn.ReLU(inplace=True))
    stages = [conv1, conv2, fc1, fc2]
    init_weights(stages)
    return Backbone(
        stages,
        nn.Linear(f2, num_classes),
        input_shape=(in_channels, *input_size),
        stage_names=["conv1", "conv2", "fc1", "fc2"],
    )
