"""MSDNet (Huang et al., ICLR 2018): Multi-Scale Dense Networks, built for early exits.

The network keeps ``scales`` feature maps side by side, each half the size of the one before.
A first layer makes them from the image; every later layer densely grows each scale with new
features computed from that scale (3x3 conv) and from the next finer one (3x3, stride 2), half
and half. Exits read the coarsest scale, which holds the most global features from the start,
so an early classifier need not wait for depth to see the whole image. As depth grows the
finest scales are dropped (they no longer feed anything the exits read) and 1x1 transition
layers compress the channels.

Every block of layers is a stage; its state is the tuple of the scales still in use, the
coarsest first (what an exit head reads, :func:`eenn.backbones.head_input`), the finest last.
The default exit head on these states is ``msdnet``, the paper's classifier (two strided 3x3
convs of 128 channels, pooling, fully connected), which is also the backbone's own.

Channels are counted in units: scale ``s`` holds ``units * gr_factor[s]`` channels, a layer
adds ``growth`` units and a transition multiplies them by ``reduction``. The defaults are the
paper's CIFAR settings (16 units, growth 6, factors 1-2-4, bottlenecks) with 4 blocks of 4, 2,
2, 2 layers: 23M MACs on 28x28 grey images (33M through every exit's ``msdnet`` head), 30M on
32x32 RGB (40M), 0.53M parameters (1.5M with the three heads).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..heads import msdnet_body
from ..registry import is_whole
from ._layers import check_width, conv_bn_act, init_weights, scaled
from .base import Backbone, State, register_backbone

__all__ = ["MSDBlock", "msdnet", "scale_plan"]


def _branch(in_ch: int, out_ch: int, stride: int, bn_factor: int | None) -> nn.Sequential:
    """A 3x3 conv-BN-ReLU (of ``stride``), behind a 1x1 bottleneck to at most ``bn_factor`` times
    its output channels when ``bn_factor`` is given (never wider than its input)."""
    if bn_factor is None:
        return conv_bn_act(in_ch, out_ch, 3, stride)
    inner = min(in_ch, bn_factor * out_ch)
    return nn.Sequential(conv_bn_act(in_ch, inner, 1), conv_bn_act(inner, out_ch, 3, stride))


class ScaleGrowth(nn.Module):
    """What one dense layer appends to one scale's features: ``growth`` new channels, from the
    scale itself and, when ``finer_ch`` is given, half of them from the next finer scale."""

    def __init__(self, own_ch: int, finer_ch: int | None, growth: int, bn_own: int | None,
                 bn_finer: int | None) -> None:
        super().__init__()
        from_finer = growth // 2 if finer_ch else 0
        self.down = _branch(finer_ch, from_finer, 2, bn_finer) if finer_ch else None
        self.same = _branch(own_ch, growth - from_finer, 1, bn_own)

    def forward(self, own: Tensor, finer: Tensor | None = None) -> Tensor:
        parts = [own, self.same(own)]
        if self.down is not None:
            parts.append(self.down(finer))
        return torch.cat(parts, 1)


class DenseLayer(nn.Module):
    """One MSDNet layer: reads the scales ``in_first..S-1`` (absolute indices, finest first),
    grows and returns the scales ``out_first..S-1``. A scale dropped here (``in_first <
    out_first``) still feeds the next coarser scale once more."""

    def __init__(self, in_first: int, out_first: int, units: int, growth: int, gr_factor: Sequence[int],
                 bn_factor: Sequence[int] | None) -> None:
        super().__init__()
        self.num_scales, self.out_first = len(gr_factor), out_first
        bn = (lambda s: bn_factor[s]) if bn_factor is not None else (lambda s: None)
        self.scales = nn.ModuleList(
            ScaleGrowth(units * gr_factor[s], units * gr_factor[s - 1] if s > in_first else None,
                        growth * gr_factor[s], bn(s), bn(s - 1) if s > in_first else None)
            for s in range(out_first, len(gr_factor))
        )

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        skip = self.num_scales - len(xs)  # xs holds the coarsest scales, from scale `skip` on
        return [grow(xs[s - skip], xs[s - skip - 1] if grow.down is not None else None)
                for s, grow in enumerate(self.scales, start=self.out_first)]


class Transition(nn.Module):
    """A 1x1 conv-BN-ReLU per scale, from ``units`` to ``new_units`` channel units."""

    def __init__(self, first: int, units: int, new_units: int, gr_factor: Sequence[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(conv_bn_act(units * g, new_units * g, 1) for g in gr_factor[first:])

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [conv(x) for conv, x in zip(self.convs, xs)]


class FirstLayer(nn.Module):
    """The image to every scale: a 3x3 conv at the finest, then a strided 3x3 conv per coarser one."""

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        ins = [in_channels, *widths[:-1]]
        self.convs = nn.ModuleList(conv_bn_act(i, o, 3, 1 if s == 0 else 2) for s, (i, o) in enumerate(zip(ins, widths)))

    def forward(self, x: Tensor) -> list[Tensor]:
        xs = []
        for conv in self.convs:
            x = conv(x)
            xs.append(x)
        return xs


class MSDBlock(nn.Module):
    """A stage: (the first layer, for the first block) then dense and transition layers. Takes
    the image or the previous block's state, returns the scales in use, coarsest first."""

    def __init__(self, layers: Sequence[nn.Module], first: FirstLayer | None = None) -> None:
        super().__init__()
        self.first = first
        self.layers = nn.ModuleList(layers)

    def forward(self, state: State) -> tuple[Tensor, ...]:
        if self.first is not None:
            xs = self.first(state)
        else:  # a lone scale may come as a bare tensor (an exported segment's single input)
            xs = [state] if isinstance(state, Tensor) else list(reversed(state))
        for layer in self.layers:
            xs = layer(xs)
        return tuple(reversed(xs))


def scale_plan(layers: int, scales: int, prune: str) -> list[tuple[int, int]]:
    """``(scales in, scales out)`` of each of ``layers`` dense layers. ``"max"`` drops a scale
    every ``ceil(layers / scales)`` layers; ``"min"`` keeps every scale until the last layers,
    dropping one per layer. Either way the last layer makes the coarsest scale alone, the only
    one the classifier reads (with "max" it may otherwise grow finer ones for nothing [ours])."""
    if prune == "max":
        every = math.ceil(layers / scales)
        plan = [(scales - max(0, l - 2) // every, scales - (l - 1) // every) for l in range(1, layers + 1)]
        return plan[:-1] + [(plan[-1][0], 1)]
    return [(min(scales, layers - l + 2), min(scales, layers - l + 1)) for l in range(1, layers + 1)]


def _check(ok: bool, option: str, accepted: str, value: object) -> None:
    if not ok:
        raise ValueError(f"msdnet: option {option!r} must be {accepted}, got {value!r}")


def _factors(option: str, value: Sequence[int] | None, scales: int) -> list[int]:
    """Per-scale factors; None: 1, 2, 4, then 4 (the paper's CIFAR and ImageNet settings)."""
    if value is None:
        return [min(2 ** s, 4) for s in range(scales)]
    _check(isinstance(value, (list, tuple)) and len(value) == scales and all(is_whole(v, 1) for v in value), option,
           f"one int >= 1 per scale ({scales})", value)
    return [int(v) for v in value]


@register_backbone("msdnet", head="msdnet")
def msdnet(
    *,
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    blocks: int = 4,
    scales: int = 3,
    base: int = 4,
    step: int = 2,
    step_mode: str = "even",
    channels: int = 16,
    growth: int = 6,
    gr_factor: Sequence[int] | None = None,
    bn_factor: Sequence[int] | None = None,
    bottleneck: bool = True,
    prune: str = "max",
    reduction: float = 0.5,
    classifier_width: int = 128,
    width: float = 1.0,
) -> Backbone:
    """MSDNet: ``blocks`` stages (``block0``...), the first of ``base`` dense layers, the others
    of ``step`` (``step_mode="even"``) or ``step * b + 1`` (``"lin_grow"``, block ``b``) layers,
    on ``scales`` scales. ``channels``/``growth``: units of the first layer / added per layer,
    times ``gr_factor[s]`` at scale ``s``; ``bn_factor[s]``: the bottleneck width (times the
    new channels) of convs reading scale ``s`` (``bottleneck=False``: none). ``prune``: ``"max"``
    drops scales evenly over the depth, ``"min"`` only at the end; ``reduction``: transition
    layers' channel ratio (``"max"``: where a scale is dropped; ``"min"``: after a third and two
    thirds of the layers; 0: none). ``classifier_width``: the classifier's conv channels.
    ``width`` scales ``channels`` and ``growth``."""
    check_width(width)
    for option, value, least in (("blocks", blocks, 1), ("scales", scales, 1), ("base", base, 1), ("step", step, 1),
                                 ("channels", channels, 1), ("growth", growth, 2), ("classifier_width", classifier_width, 1)):
        _check(is_whole(value, least), option, f"an int >= {least}", value)
    _check(step_mode in ("even", "lin_grow"), "step_mode", "'even' or 'lin_grow'", step_mode)
    _check(prune in ("max", "min"), "prune", "'max' or 'min'", prune)
    _check(0 <= reduction <= 1, "reduction", "in [0, 1] (0: no transition layers)", reduction)
    gr = _factors("gr_factor", gr_factor, scales)
    bn = _factors("bn_factor", bn_factor, scales) if bottleneck else None
    units, growth = scaled(channels, width, minimum=min(4, channels)), scaled(growth, width, minimum=2)

    steps = [base] + [step if step_mode == "even" else step * b + 1 for b in range(1, blocks)]
    total = sum(steps)
    plan = iter(scale_plan(total, scales, prune))
    first = FirstLayer(in_channels, [units * g for g in gr])
    stages: list[nn.Module] = []
    depth = 0
    for b, n in enumerate(steps):
        layers: list[nn.Module] = []
        for _ in range(n):
            depth += 1
            s_in, s_out = next(plan)
            layers.append(DenseLayer(scales - s_in, scales - s_out, units, growth, gr, bn))
            units += growth
            squeeze = s_in > s_out if prune == "max" else depth in (total // 3, 2 * total // 3)
            if reduction > 0 and squeeze:
                new_units = max(1, math.floor(reduction * units))
                layers.append(Transition(scales - s_out, units, new_units, gr))
                units = new_units
        stages.append(MSDBlock(layers, first if b == 0 else None))
    classifier = nn.Sequential(*msdnet_body(units * gr[-1], classifier_width), nn.Linear(classifier_width, num_classes))
    init_weights([*stages, classifier])
    return Backbone(stages, classifier, input_shape=(in_channels, *input_size),
                    stage_names=[f"block{b}" for b in range(blocks)])
