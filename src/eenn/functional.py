"""Pure tensor functions shared by training and inference (the layer below both, as
``torch.nn.functional`` is to ``torch.nn``): exit losses, the stick-breaking arithmetic of the
gated methods, AEP's weighted ensembles of the exits so far, and ZTW's geometric ensembles.

The objectives (training) and the exit policies, engine and deployment (inference) import from
here; this module imports neither.

Stick breaking. With gates g_1..g_B (g_B = 1), the soft-conditional recursion
``f~_B = f_B,  f~_b = g_b f_b + (1 - g_b) f~_{b+1}`` unrolls to ``f~_1 = sum_b pi_b f_b`` with
``pi_b = g_b prod_{j<b} (1 - g_j)``; the same weights give an expected cost
``sum_b pi_b gamma_b``. Both forms are here: the recursion mirrors the papers, the closed form is
one vectorised product (the tests check they agree).

AEP weight schemes (assumptions [I], see :mod:`eenn.objectives.aep`): ``uniform`` w_i = 1/N;
``linear`` w_i = i / sum_j j; ``learned`` w = softmax(theta); ``hybrid`` softmax(theta + log i).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SCHEMES", "ensemble_so_far", "ensemble_so_far_log", "exit_losses", "first_above",
           "geometric_ensemble", "scheme_log_weights", "scheme_weights", "soft_conditional",
           "soft_conditional_recursive", "stick_breaking"]

SCHEMES = ("uniform", "linear", "learned", "hybrid")


def exit_losses(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of every exit: ``[E, B, C]`` logits -> ``[E]``, in one kernel."""
    e, b, _ = logits.shape
    ce = F.cross_entropy(logits.flatten(0, 1), targets.repeat(e), reduction="none", label_smoothing=label_smoothing)
    return ce.view(e, b).mean(1)


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


def scheme_log_weights(scheme: str, num_exits: int, theta: Tensor | None = None) -> Tensor:
    """``log w`` ``[E]`` of a weight scheme (see the module docstring); ``theta`` is needed by
    ``learned`` and ``hybrid`` only. Log space keeps the learned weights' gradient finite
    however small a weight becomes."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown AEP weight scheme {scheme!r}; choose {', '.join(SCHEMES)}")
    n = int(num_exits)
    if n < 1:
        raise ValueError(f"num_exits must be >= 1, got {n}")
    dev = theta.device if theta is not None else None
    depth = torch.arange(1, n + 1, dtype=torch.float32, device=dev)
    if scheme == "uniform":
        return torch.full((n,), -math.log(n), device=dev)
    if scheme == "linear":
        return depth.log() - math.log(n * (n + 1) / 2)
    if theta is None or theta.shape != (n,):
        raise ValueError(f"scheme {scheme!r} needs theta of shape ({n},), got "
                         f"{None if theta is None else tuple(theta.shape)}")
    if scheme == "learned":
        return F.log_softmax(theta.float(), 0)
    return F.log_softmax(theta.float() + depth.log(), 0)  # hybrid: linear prior x softmax(theta), renormalised


def scheme_weights(scheme: str, num_exits: int, theta: Tensor | None = None) -> Tensor:
    """The normalised weights ``w [E]`` of a scheme (they sum to 1)."""
    return scheme_log_weights(scheme, num_exits, theta).exp()


def ensemble_so_far(logits: Tensor, weights: Tensor, *, check: bool = True) -> Tensor:
    """The ensemble truncated at every exit: ``[E, B, C]`` logits -> ``[E, B, C]`` probabilities
    whose row ``k`` is ``sum_{i<=k} w_i p_i / sum_{i<=k} w_i``. Row ``E-1`` is the full ensemble.
    A row whose weights so far are all 0 comes out as zeros (there is no ensemble yet).

    Pruning and the pruned network both compute their output with this one function, so that
    the accuracy promised on the validation split is reproduced bit for bit. ``check=False``
    skips the weights' validation, which waits for the device (for timed inference loops)."""
    w = torch.as_tensor(weights, dtype=torch.float32, device=logits.device)
    if w.shape != logits.shape[:1]:
        raise ValueError(f"need one weight per exit ({logits.shape[0]}), got shape {tuple(w.shape)}")
    if check and (bool((w < 0).any()) or not bool((w > 0).any())):
        raise ValueError(f"ensemble weights must be >= 0 and not all zero, got {w.tolist()}")
    p = F.softmax(logits.float(), dim=-1)
    num = torch.cumsum(w[:, None, None] * p, dim=0)
    den = torch.cumsum(w, dim=0).clamp_min(torch.finfo(torch.float32).tiny)
    return num / den[:, None, None]


def ensemble_so_far_log(logits: Tensor, log_weights: Tensor) -> Tensor:
    """The log of :func:`ensemble_so_far`, from ``log w``, computed stably (for training)."""
    lw = log_weights.to(logits.device, torch.float32)
    num = torch.logcumsumexp(lw[:, None, None] + F.log_softmax(logits.float(), dim=-1), dim=0)
    return num - torch.logcumsumexp(lw, dim=0)[:, None, None]


def geometric_ensemble(logits: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """ZTW's ensembles of the exits so far: ``[E, B, C]`` exit logits -> ``[E, B, C]`` ensemble
    logits ``z_i = (1/i) sum_{j<=i} exp(w_ij) log_softmax(h_j) + b_i`` (1-based i), from
    ``weight [E, E]`` (only j <= i is read) and ``bias [E, C]``. Row ``i`` depends on exits
    ``<= i`` only, so a row computed on the first ``k`` exits (the rest padded) is final."""
    e = weight.shape[0]
    if logits.shape[0] != e or logits.shape[-1] != bias.shape[-1]:
        raise ValueError(f"a geometric ensemble of {e} exits and {bias.shape[-1]} classes got logits of shape "
                         f"{tuple(logits.shape)}")
    i = torch.arange(1, e + 1, dtype=torch.float32, device=logits.device)
    scale = torch.tril(torch.ones(e, e, device=logits.device)) / i[:, None]
    log_p = F.log_softmax(logits.float(), dim=-1)
    # masked_fill, not a product alone: exp of an unused (j > i) weight may overflow to inf.
    w = weight.to(logits.device).exp().masked_fill(scale == 0, 0.0) * scale
    return torch.einsum("ij,jbc->ibc", w, log_p) + bias.to(logits.device)[:, None, :]
