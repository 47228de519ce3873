"""MobileNetV2 (Sandler et al. 2018) for small images: stride-1 stem and second group, so a
32x32 input ends at 4x4 instead of 1x1. One stage per inverted-residual block."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ._layers import avgpool_linear, check_dropout, check_size, check_width, conv_bn_act, init_weights, make_divisible
from .base import Backbone, register_backbone

__all__ = ["mobilenetv2"]

# (expansion t, channels c, blocks n, first stride s); ImageNet uses s=2 for the 24-channel group.
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    """1x1 expand + 3x3 depthwise + linear 1x1 projection, residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int, kernel_size: int = 3) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(in_ch, hidden, 1, act=nn.ReLU6))
        layers.append(conv_bn_act(hidden, hidden, kernel_size, stride, groups=hidden, act=nn.ReLU6))
        # No activation after the projection: the paper's linear bottleneck.
        layers.append(conv_bn_act(hidden, out_ch, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + out if self.residual else out


def _check_settings(settings: Sequence[Sequence[int]]) -> list[tuple[int, int, int, int, int]]:
    rows = []
    for row in settings:
        r = [int(v) for v in row]
        if len(r) == 4:
            r.append(3)
        if len(r) != 5 or min(r[:4]) < 1 or r[4] < 1 or r[4] % 2 == 0:
            raise ValueError(f"settings: each row is (expansion, channels, blocks, stride[, odd kernel size]) with "
                             f"positive values, got {list(row)}")
        rows.append(tuple(r))
    if not rows:
        raise ValueError("settings: need at least one group")
    return rows  # type: ignore[return-value]


@register_backbone("mobilenetv2")
def mobilenetv2(
    *,
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    width: float = 1.0,
    dropout: float = 0.2,
    settings: Sequence[Sequence[int]] | None = None,
    stem_channels: int = 32,
    last_channels: int | None = None,
) -> Backbone:
    """MobileNetV2, CIFAR style; 17 stages (stem in the first, final 1x1 conv in the last).

    ``settings`` replaces the paper's groups by rows ``(expansion, channels, blocks, first
    stride)`` or ``(expansion, channels, blocks, first stride, kernel size)`` (kernel 3 when
    omitted); ``stem_channels`` and ``last_channels`` (default 1280, or wider with ``width``)
    set the stem and the final 1x1 conv. The design search varies these per group."""
    check_width(width)
    check_size("mobilenetv2", "stem_channels", stem_channels)
    check_size("mobilenetv2", "last_channels", last_channels)
    check_dropout("mobilenetv2", dropout)
    rows = _check_settings(_SETTINGS if settings is None else settings)
    in_ch = make_divisible(stem_channels * width)
    # thinner nets keep the wide last layer
    last_ch = make_divisible(1280 * max(1.0, width)) if last_channels is None else int(last_channels)
    stem = conv_bn_act(in_channels, in_ch, 3, act=nn.ReLU6)
    stages: list[nn.Module] = []
    for t, c, n, s, k in rows:
        out_ch = make_divisible(c * width)
        for i in range(n):
            block = InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t, k)
            # The stem alone is too shallow to be worth an exit, so it shares the first stage.
            stages.append(nn.Sequential(stem, block) if not stages else block)
            in_ch = out_ch
    stages[-1] = nn.Sequential(stages[-1], conv_bn_act(in_ch, last_ch, 1, act=nn.ReLU6))
    init_weights(stages)
    return Backbone(
        stages,
        avgpool_linear(last_ch, num_classes, dropout),
        input_shape=(in_channels, *input_size),
        stage_names=[f"block{i + 1}" for i in range(len(stages))],
    )
