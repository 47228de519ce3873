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
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["CostTable", "count_macs", "count_params", "flop_counter"]

aten = torch.ops.aten


# PyTorch's flop counter misses the fused inference kernels that attention takes on the CPU and
# in eval mode: scaled_dot_product_attention's CPU flash kernel and the fast paths of
# nn.MultiheadAttention and nn.TransformerEncoderLayer. Without these formulas a transformer's
# attention (and, on the fast path, its whole block) would cost nothing. The formulas count the
# same products as the decomposed (training-mode) path, so a block costs the same either way.
def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _attention_flops(b: int, n: int, s: int, d: int) -> int:
    """Q @ K^T and softmax(.) @ V for ``b`` samples, ``n`` queries, ``s`` keys, width ``d``."""
    return 2 * 2 * b * n * s * d


def _native_mha(query, key, value, embed_dim, num_head, qkv_weight, *args, out_shape=None, **kwargs) -> int:
    b, n, d = query
    s = key[1]
    proj = 2 * b * (n + 2 * s) * d * d + 2 * b * n * d * d  # in-projections of q, k, v; out-projection
    return proj + _attention_flops(b, n, s, d)


def _encoder_layer(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu, norm_first,
                   eps, nw1, nb1, nw2, nb2, ffn_weight_1, *args, out_shape=None, **kwargs) -> int:
    b, n, d = src
    hidden = ffn_weight_1[0]
    return 2 * b * n * (4 * d * d + 2 * d * hidden) + _attention_flops(b, n, n, d)


_EXTRA_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    aten._native_multi_head_attention: _native_mha,
    aten._transformer_encoder_layer_fwd: _encoder_layer,
}


def flop_counter() -> FlopCounterMode:
    """PyTorch's flop counter, with formulas for the fused attention kernels it misses."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)


def count_macs(module: nn.Module | callable, *inputs) -> int:
    """MACs of one call ``module(*inputs)`` (flop-counter FLOPs / 2)."""
    with torch.no_grad(), flop_counter() as counter:
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


def profile_stages(stages: Sequence[nn.Module], classifier: nn.Module, input_shape: Sequence[int],
                   input_dtype: torch.dtype | None = None) -> tuple[list[int], int]:
    """MACs of each stage, in order, and of the classifier, for one sample (a zero input of
    ``input_dtype``; by default the parameters' floating type)."""
    from .backbones.base import head_input

    mods = [*stages, classifier]
    p = _first_param(mods)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    modes = [m.training for m in mods]
    for m in mods:
        m.eval()
    try:
        state = torch.zeros(1, *input_shape, device=device, dtype=input_dtype or dtype)
        macs = []
        for stage in stages:
            with torch.no_grad(), flop_counter() as counter:
                state = stage(state)
            macs.append(int(counter.get_total_flops()) // 2)
        return macs, count_macs(classifier, head_input(state))
    finally:
        for m, mode in zip(mods, modes):
            m.train(mode)
