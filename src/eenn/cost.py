"""Cost accounting: per-exit MACs and parameters, measured with ``torch.utils.flop_counter``.

MACs here are what the flop counter counts (convolutions, matrix products, attention) divided
by two; element-wise work (BatchNorm, activations, pooling) is not counted, as is usual for
MAC tables. Costs are per sample (measured at batch size 1).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["CostTable", "count_macs", "count_params"]


def count_macs(module: nn.Module | callable, *inputs) -> int:
    """MACs of one call ``module(*inputs)`` (flop-counter FLOPs / 2)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops()) // 2


def count_params(modules: Iterable[nn.Module]) -> int:
    """Parameters of ``modules``, each tensor counted once even where modules share it."""
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


@dataclass(frozen=True)
class CostTable:
    """Per-exit costs of a multi-exit network; exit ``E-1`` is the final classifier.

    - ``macs[e]``: backbone up to exit ``e`` plus that exit's own head (the usual
      "cumulative MACs"); the last entry is the whole backbone plus its classifier.
    - ``dynamic_macs[e]``: what a sample leaving at exit ``e`` really costs under dynamic
      inference, where every earlier head was evaluated on the way.
    - ``params[e]``: parameters needed to compute exit ``e`` (backbone to there + its head).
    - ``fraction[e]``: ``macs[e] / macs[-1]``.
    """

    exit_names: tuple[str, ...]
    stage_index: tuple[int, ...]
    backbone_macs: tuple[int, ...]
    head_macs: tuple[int, ...]
    macs: tuple[int, ...]
    dynamic_macs: tuple[int, ...]
    params: tuple[int, ...]
    fraction: tuple[float, ...]
    total_params: int  # the whole multi-exit network, every head included

    @property
    def num_exits(self) -> int:
        return len(self.macs)

    def expected_macs(self, exit_distribution: Sequence[float] | Tensor, *, dynamic: bool = True) -> float:
        """Expected MACs per sample for a distribution over exits (fractions summing to 1)."""
        dist = torch.as_tensor(exit_distribution, dtype=torch.float64)
        if dist.shape != (self.num_exits,):
            raise ValueError(f"need one fraction per exit ({self.num_exits}), got shape {tuple(dist.shape)}")
        costs = torch.tensor(self.dynamic_macs if dynamic else self.macs, dtype=torch.float64)
        return float((dist * costs).sum())

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        rows = [("exit", "stage", "MACs", "+heads", "params", "of full")]
        for i, name in enumerate(self.exit_names):
            rows.append(
                (
                    name,
                    str(self.stage_index[i]),
                    _human(self.macs[i]),
                    _human(self.dynamic_macs[i]),
                    _human(self.params[i]),
                    f"{100 * self.fraction[i]:.1f}%",
                )
            )
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _first_param(modules: Sequence[nn.Module]) -> Tensor | None:
    for m in modules:
        for p in m.parameters():
            return p
    return None


def profile_stages(stages: Sequence[nn.Module], classifier: nn.Module, input_shape: Sequence[int]) -> tuple[list[int], int]:
    """MACs of each stage, in order, and of the classifier, for one sample."""
    from .backbones.base import head_input

    mods = [*stages, classifier]
    p = _first_param(mods)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    modes = [m.training for m in mods]
    for m in mods:
        m.eval()
    try:
        state = torch.zeros(1, *input_shape, device=device, dtype=dtype)
        macs = []
        for stage in stages:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                state = stage(state)
            macs.append(int(counter.get_total_flops()) // 2)
        return macs, count_macs(classifier, head_input(state))
    finally:
        for m, mode in zip(mods, modes):
            m.train(mode)
