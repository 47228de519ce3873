"""Differentiable branching (Scardapane et al., ICASSP 2020; METHODS.md §1).

Every intermediate exit b emits class logits h_b and a gate g_b = sigmoid(extra unit); the final
exit's gate is 1. The network's soft output and its expected cost are the soft-conditional
mixtures of the exits (``mixing.py``)::

    f~_1 = sum_b pi_b f_b,   C = mean over the batch of sum_b pi_b gamma_b,
    pi_b = g_b prod_{j<b} (1 - g_j),   gamma_b = MACs up to exit b / MACs of the whole network,

and training minimises ``L = CE(f~_1, y) + lam * C``. A larger ``lam`` buys a cheaper network:
the gates learn to open earlier. At inference either the soft output is used (every exit runs;
nothing is saved) or the hard rule stops at the first gate above 0.5.

The pieces other methods share (reading the exits' costs, NLL of mixed probabilities) live
here too; EENets (``eenets.py``) imports them.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..network import ExitOutputs, MultiExitNetwork
from .base import Objective, register_objective
from ..functional import exit_losses, first_above, soft_conditional

__all__ = [
    "Branching",
    "COST_KINDS",
    "GATE_INITS",
    "MIX_MODES",
    "balanced_bce",
    "correctness_bce",
    "exit_costs",
    "hard_exit",
    "init_gates",
    "probs_nll",
    "require_gates",
    "soft_cost",
    "soft_output",
]

MIX_MODES = ("probs", "logits")
COST_KINDS = ("macs", "dynamic")
GATE_INITS = ("uniform", "none")

# Probabilities are clamped before the log so that a mixture whose true-class mass underflows
# gives a large finite loss instead of inf / NaN gradients.
PROB_FLOOR = 1e-12


# ------------------------------------------------------------------------ shared helpers
def require_gates(net: MultiExitNetwork, method: str, head: str) -> None:
    """Refuse a network whose exit heads emit no gate (the gated methods learn those gates)."""
    if not getattr(net, "has_gates", False):
        raise ValueError(
            f"{method} needs gated exit heads (every intermediate exit must emit a gate); "
            f"build the network with head={head!r}"
        )


def exit_costs(net: MultiExitNetwork, kind: str = "macs") -> Tensor:
    """gamma_b of every exit from the network's cost table, normalised so the final exit's is 1.

    ``"macs"``: MACs up to and including exit b (backbone + that exit's head), the papers'
    ``FLOPs up to branch b / full-network FLOPs``. ``"dynamic"``: what a sample leaving at b
    really costs when every earlier head ran on the way (``CostTable.dynamic_macs``)."""
    if kind not in COST_KINDS:
        raise ValueError(f"unknown cost {kind!r}; choose one of {', '.join(COST_KINDS)}")
    table = net.cost()
    macs = table.macs if kind == "macs" else table.dynamic_macs
    gamma = torch.tensor([float(m) for m in macs], dtype=torch.float32)
    return gamma / gamma[-1]


def probs_nll(probs: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean negative log-likelihood of ``targets`` under ``probs`` ``[B, C]`` (already a
    distribution, e.g. a mixture of softmaxes).

    Label smoothing is applied exactly as ``F.cross_entropy`` applies it to logits: the target
    is ``(1 - eps) one_hot + eps / C``, so the loss is ``(1 - eps) NLL - eps mean_k log p_k``.
    On ``probs = softmax(h)`` this equals ``F.cross_entropy(h, y, label_smoothing=eps)``."""
    logp = probs.clamp_min(PROB_FLOOR).log()
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(1)
    return nll.mean()


# ---------------------------------------------------- what keeps the gated exits alive [ours]
# Trained with the papers' literal losses at a real budget (full Fashion-MNIST, 15 epochs), the
# gates collapse: an exit's classifier learns only through its mixture weight
# pi_b = g_b prod_{j<b} (1 - g_j), so whichever exit leads early takes the mixture, the other
# gates close and their heads stay at chance (a mixture of experts' rich-get-richer). The three
# pieces below are what the gated objectives add by default; each can be switched off, and all
# three off give the literal loss back.
def init_gates(net: MultiExitNetwork) -> None:
    """Start every early exit's gate at ``g_b = 1 / (E - b)`` (b = 0..E-2, E exits) with zero
    input weights, so that the stick-breaking weights pi_b are uniform, 1/E each, at the first
    step [ours]. PyTorch's default init gives g ~ 0.5 everywhere, i.e. pi = [1/2, 1/4, 1/8, ...]:
    with 8 exits the deepest early exits start with under 1% of the first exit's gradient."""
    e = net.num_exits
    with torch.no_grad():
        for b, head in enumerate(getattr(net, "heads", ())):  # a network without heads: nothing to set
            if getattr(head, "gate", None) is None:
                continue
            g = 1.0 / (e - b)
            head.gate.weight.zero_()
            head.gate.bias.fill_(math.log(g / (1.0 - g)) if g < 1.0 else 0.0)


def balanced_bce(gates: Tensor, target: Tensor) -> Tensor:
    """``sum_b BCE(g_b, t_b)`` over exits (rows), class-balanced per exit on the batch: a positive
    is weighted by the exit's negative rate and a negative by its positive rate (EENets v4's
    weighting), so a rare outcome's few samples weigh as much, in total, as the common one's.
    ``gates``, ``target`` ``[E', B]`` -> scalar."""
    target = target.to(gates.dtype)
    rate = target.mean(1, keepdim=True)
    weight = target * (1 - rate) + (1 - target) * rate
    # binary_cross_entropy clamps log at -100, so a saturated gate gives a finite loss.
    return F.binary_cross_entropy(gates, target, weight=weight, reduction="none").mean(1).sum()


def correctness_bce(logits: Tensor, gates: Tensor, targets: Tensor) -> Tensor:
    """Gate supervision: each early gate is trained, class-balanced (:func:`balanced_bce`), to
    say whether its own exit already answers the sample correctly, ``1[argmax h_b = y]`` (a
    detached target). This gives a gate a signal of its own instead of only the mixture's [ours;
    the same idea as the Scardapane group's later confidence-branch code and EENets v4's exit
    tags]. ``logits [E, B, K]``, ``gates [E, B]`` (the final exit has none to learn)."""
    with torch.no_grad():
        correct = logits[:-1].argmax(-1) == targets[None]
    return balanced_bce(gates[:-1], correct)


def _check_gate_init(value: str | None) -> str:
    value = "none" if value is None else str(value)
    if value not in GATE_INITS:
        raise ValueError(f"unknown gate_init {value!r}; choose one of {', '.join(GATE_INITS)}")
    return value


def _check_weight(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _check_outputs(outputs: ExitOutputs, gamma: Tensor, method: str) -> Tensor:
    if outputs.gates is None:
        raise ValueError(f"{method}: the network's outputs carry no gates; build it with gated exit heads")
    if gamma.numel() == 0:
        raise RuntimeError(f"{method}: call prepare(net) before computing the loss (it reads the exits' costs)")
    if outputs.logits.shape[0] != gamma.numel():
        raise ValueError(f"{method}: got outputs of {outputs.logits.shape[0]} exits, but the network prepared "
                         f"has {gamma.numel()}; every exit must be computed")
    return gamma.to(outputs.gates.device, outputs.gates.dtype)


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam (the cost weight) must be a finite number >= 0, got {lam}")
    return lam


def _check_smoothing(eps: float) -> float:
    eps = float(eps)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {eps}")
    return eps


# ----------------------------------------------------------------------- policy functions
def soft_output(outputs: ExitOutputs, mix: str = "probs") -> Tensor:
    """Inference option 1, the soft ensemble: ``f~_1`` as class probabilities ``[B, C]``.

    ``mix="probs"`` mixes the exits' softmax probabilities; ``"logits"`` mixes logits and
    applies softmax to the mixture (what the model was trained on with that setting)."""
    if outputs.gates is None:
        raise ValueError("soft_output needs gated outputs (a network built with gated exit heads)")
    if mix == "probs":
        return soft_conditional(outputs.logits.softmax(-1), outputs.gates)
    if mix == "logits":
        return soft_conditional(outputs.logits, outputs.gates).softmax(-1)
    raise ValueError(f"unknown mix {mix!r}; choose one of {', '.join(MIX_MODES)}")


def hard_exit(gates: Tensor, threshold: float = 0.5) -> Tensor:
    """Inference option 2: per sample, the first exit whose gate exceeds ``threshold``
    (strictly), else the final exit. ``[E, B]`` -> ``[B]``."""
    return first_above(gates, threshold)


def soft_cost(gates: Tensor, costs: Tensor | Sequence[float]) -> Tensor:
    """Per-sample expected normalised cost ``gamma~_1 = sum_b pi_b gamma_b`` (``[E, B]`` -> ``[B]``)."""
    gamma = torch.as_tensor(costs, dtype=gates.dtype, device=gates.device)
    return soft_conditional(gamma[:, None].expand_as(gates), gates)


# ------------------------------------------------------------------------------ objective
@register_objective("branching")
class Branching(Objective):
    """``L = CE(f~_1, y) + lam * C`` (Scardapane et al. 2020), plus, by default, what keeps
    every exit trained at a real budget (see :func:`init_gates`, :func:`correctness_bce`).

    Args:
        lam: weight of the expected cost C. The default 0.3 is ours, chosen with
            ``benchmarks/lambda_sweep.py``; the in-group re-implementation's 0.001 (jaryP,
            ``adaptive.yaml``) is far below the cross-entropy gaps between exits (C is a fraction
            of the full network's MACs: the largest saving per sample is under one nat x lam).
        mix: ``"probs"`` (default) mixes softmax probabilities and takes ``NLL(log f~_1)``:
            assumption [I], the natural reading of a convex combination of classifiers and the
            same recursion as EENets v1. ``"logits"`` mixes logits and applies cross-entropy,
            as the re-implementation does [C].
        final_ce: add ``CE(h_B, y)`` of the final exit, as the re-implementation does [C].
        cost: ``"macs"`` (gamma_b from ``CostTable.macs``) or ``"dynamic"`` (``dynamic_macs``,
            earlier heads included); both normalised so that gamma_B = 1.
        label_smoothing: applied to every cross-entropy term; with ``mix="probs"`` the smoothed
            target is applied to ``log f~_1`` exactly as cross-entropy applies it to log-softmax
            (see :func:`probs_nll`).
        exit_ce: weight of ``sum_b CE(h_b, y)``, every exit's own cross-entropy, so that no head
            depends on its mixture weight for its gradient [ours; BranchyNet's joint loss].
        gate_bce: weight of :func:`correctness_bce`, each gate trained to tell whether its exit is
            already right [ours].
        gate_init: ``"uniform"`` sets the gates at :meth:`prepare` so that the mixture starts
            uniform over the exits (:func:`init_gates`); ``"none"`` keeps the head's own init.
            Gates are set before a resumed run loads its weights, so resuming is unaffected; to
            fine-tune a trained gated network, pass ``"none"``.

    ``Branching(exit_ce=0, gate_bce=0, gate_init="none", lam=0.001)`` is the paper's literal
    loss with the re-implementation's weight; at a real budget its gates collapse (see
    docs/RESULTS.md).

    Logged parts: ``ce`` (the mixture's CE), ``cost`` (C, the expected fraction of the full
    network's MACs under the soft rule), ``final_ce`` / ``exit_ce`` / ``gate_bce`` when enabled,
    and per-exit CEs.
    """

    def __init__(self, lam: float = 0.3, mix: str = "probs", final_ce: bool = False, cost: str = "macs",
                 label_smoothing: float = 0.0, exit_ce: float = 1.0, gate_bce: float = 1.0,
                 gate_init: str | None = "uniform") -> None:
        super().__init__()
        if mix not in MIX_MODES:
            raise ValueError(f"unknown mix {mix!r}; choose one of {', '.join(MIX_MODES)}")
        if cost not in COST_KINDS:
            raise ValueError(f"unknown cost {cost!r}; choose one of {', '.join(COST_KINDS)}")
        self.lam = _check_lam(lam)
        self.mix = mix
        self.final_ce = bool(final_ce)
        self.cost_kind = cost
        self.label_smoothing = _check_smoothing(label_smoothing)
        self.exit_ce = _check_weight("exit_ce", exit_ce)
        self.gate_bce = _check_weight("gate_bce", gate_bce)
        self.gate_init = _check_gate_init(gate_init)
        # Derived from the network in prepare(), not state: kept out of the state_dict.
        self.register_buffer("gamma", torch.ones(0), persistent=False)

    def extra_repr(self) -> str:
        return (f"lam={self.lam}, mix={self.mix!r}, final_ce={self.final_ce}, cost={self.cost_kind!r}, "
                f"exit_ce={self.exit_ce}, gate_bce={self.gate_bce}, gate_init={self.gate_init!r}")

    def prepare(self, net: MultiExitNetwork) -> None:
        require_gates(net, "differentiable branching", "branching")
        self.gamma = exit_costs(net, self.cost_kind).to(self.gamma.device)
        if self.gate_init == "uniform":
            init_gates(net)

    def forward(self, outputs: ExitOutputs, targets: Tensor, indices: Tensor | None = None) -> dict[str, Tensor]:
        gamma = _check_outputs(outputs, self.gamma, "branching")
        logits, gates = outputs.logits, outputs.gates
        eps = self.label_smoothing
        if self.mix == "probs":
            ce = probs_nll(soft_conditional(logits.softmax(-1), gates), targets, eps)
        else:
            ce = F.cross_entropy(soft_conditional(logits, gates), targets, label_smoothing=eps)
        cost = soft_cost(gates, gamma).mean()
        loss = ce + self.lam * cost
        out = {"ce": ce.detach(), "cost": cost.detach()}
        if self.final_ce:
            final = F.cross_entropy(logits[-1], targets, label_smoothing=eps)
            loss = loss + final
            out["final_ce"] = final.detach()
        per_exit = exit_losses(logits, targets, eps)
        if self.exit_ce:
            loss = loss + self.exit_ce * per_exit.sum()
            out["exit_ce"] = per_exit.sum().detach()
        if self.gate_bce:
            bce = correctness_bce(logits, gates, targets)
            loss = loss + self.gate_bce * bce
            out["gate_bce"] = bce.detach()
        out["exit_losses"] = per_exit.detach()
        return {"loss": loss, **out}
