"""Shared arithmetic of the gated methods (differentiable branching, EENets, NACHOS).

With gates g_1..g_B (g_B = 1), the soft-conditional recursion
``f~_B = f_B,  f~_b = g_b f_b + (1 - g_b) f~_{b+1}`` unrolls to ``f~_1 = sum_b pi_b f_b`` with
stick-breaking weights ``pi_b = g_b prod_{j<b} (1 - g_j)``; the same weights give an expected
cost ``sum_b pi_b gamma_b``. Both forms are here: the recursion mirrors the papers, the closed
form is one vectorised product (and the tests check they agree).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["stick_breaking", "soft_conditional", "soft_conditional_recursive", "first_above"]


def stick_breaking(gates: Tensor) -> Tensor:
    """``pi [E, B]`` from gates ``[E, B]``: the probability of leaving at each exit when exit
    ``b`` is taken with probability ``g_b`` among samples still running. The last gate is
    treated as 1, so every column sums to 1."""
    g = torch.cat([gates[:-1], torch.ones_like(gates[-1:])], dim=0)
    survive = torch.cumprod(1 - g, dim=0)
    before = torch.cat([torch.ones_like(survive[:1]), survive[:-1]], dim=0)  # prod_{j<b}(1 - g_j)
    return g * before


def soft_conditional(values: Tensor, gates: Tensor) -> Tensor:
    """``f~_1 = sum_b pi_b f_b`` for per-exit ``values`` ``[E, B, ...]`` (probabilities, logits
    or costs broadcast to ``[E, B]``)."""
    pi = stick_breaking(gates)
    pi = pi.reshape(*pi.shape, *([1] * (values.dim() - pi.dim())))
    return (pi * values).sum(0)


def soft_conditional_recursive(values: Tensor, gates: Tensor) -> list[Tensor]:
    """Every level of the recursion, ``[f~_1, ..., f~_B]`` (EENets v2 uses them all)."""
    e = values.shape[0]
    out = [values[-1]]
    for b in range(e - 2, -1, -1):
        g = gates[b].reshape(*gates[b].shape, *([1] * (values.dim() - gates.dim())))
        out.append(g * values[b] + (1 - g) * out[-1])
    return out[::-1]


def first_above(scores: Tensor, thresholds: Tensor | float) -> Tensor:
    """Index of the first exit whose score exceeds its threshold, per sample (``[E, B]`` ->
    ``[B]``); the last exit when none does. The hard inference rule of the gated methods."""
    th = torch.as_tensor(thresholds, dtype=scores.dtype, device=scores.device)
    if th.dim() == 1:
        th = th[:, None]
    fire = scores > th
    fire[-1] = True
    return fire.to(torch.int8).argmax(0)
