"""Exit rules as small pure functions over cached per-exit outputs (STYLE.md habit 6).

A rule maps the per-exit outputs (logits ``[E, N, C]``, gates ``[E, N]`` or ``None``) to a
:class:`Scores`: one score per exit and sample ``[E, N]``, the prediction each exit would give
``[E, N]``, and the comparison ``rule`` under which a score *fires* against its exit's
threshold (``">="``, ``">"``, ``"<"`` or ``"<="``). One shared function, :func:`route`, turns
scores and per-exit thresholds into the exit index: the first exit that fires, the final exit
taking the rest (or, with ``fallback="most_confident"``, SDN's choice of the most confident exit
among all). Thresholds are a tensor ``[E-1]`` (the final exit has none) or a scalar for all.

Rules (``list_policies()``):

- ``max_prob``  max softmax probability ``>= tau_e`` (SDN, MSDNet).
- ``entropy``   entropy of the softmax ``< T_e`` (BranchyNet), in nats.
- ``margin``    top-1 minus top-2 probability ``>= tau_e``.
- ``gate``      the learned gate / confidence ``> tau_e`` (differentiable branching, EENets).
- ``cumulative`` NACHOS: ``s_i = sum_{j<=i} pi_j`` with ``pi`` the stick-breaking of the gates,
  exit when ``s_i >= eps_i``.
- ``patience``  PABEE: a counter ``c_0 = 0``, ``c_i = c_{i-1} + 1`` if ``argmax h_i ==
  argmax h_{i-1}`` else ``0``; exit at the first ``i`` with ``c_i >= t_i`` (with one ``t`` for all
  exits this is PABEE's "counter reaches the patience"). ``t = 0`` exits at once; a ``t``
  larger than ``i`` can never fire at exit ``i``.
- ``ensemble``  max probability of the ensemble so far; its prediction is the ensemble's argmax.
  Give the ensembled probabilities ``probs [E, N, C]``, or AEP ``weights [E]`` (through
  :func:`~eenn.functional.ensemble_so_far`), or a ZTW ensemble as ``ensemble`` (a
  ``GeometricEnsemble`` or its tensors ``{"weight", "bias"}``, through
  :func:`~eenn.functional.geometric_ensemble`).

Every rule also has a one-exit-at-a-time form (:func:`exit_step`, or the generic
:func:`padded_step`), which the exit loop (:mod:`.loop`) runs.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import ensemble_so_far, geometric_ensemble, stick_breaking
from ..registry import Registry

__all__ = ["Scores", "Decision", "register_policy", "get_policy", "list_policies", "as_thresholds", "threshold_tensor", "canonical",
           "per_exit", "exit_step", "padded_step", "route", "RULES", "FALLBACKS"]

RULES = (">=", ">", "<", "<=")
FALLBACKS = ("final", "most_confident")  # who answers a sample no exit took: the final exit, or SDN's most confident


class Scores(NamedTuple):
    score: Tensor  # [E, N]
    prediction: Tensor  # [E, N], long
    rule: str  # how a score fires against its threshold: score <rule> threshold
    probs: Tensor | None = None  # [E, N, C] the answering probabilities, when not softmax(logits) (ensembles)


class Decision(NamedTuple):
    exit: Tensor  # [N] the exit whose answer is given
    prediction: Tensor  # [N]
    depth: Tensor  # [N] the deepest exit computed (what the sample costs); == exit unless a fallback answered


Policy = Callable[..., Scores]
_POLICIES: Registry[Policy] = Registry("policy")
register_policy = _POLICIES.register


def get_policy(name: str | Policy) -> Policy:
    return name if callable(name) else _POLICIES.get(name)


def list_policies() -> list[str]:
    return _POLICIES.names()


# --- the rules ------------------------------------------------------------------------------

def per_exit(fn: Policy) -> Policy:
    """Mark a rule whose score at exit ``k`` depends on exit ``k``'s own outputs only; the
    engine then scores each exit alone instead of re-running the rule on every exit so far."""
    fn.per_exit = True
    return fn


def _probs(logits: Tensor) -> Tensor:
    return F.softmax(logits.float(), dim=-1)


@register_policy("max_prob")
@per_exit
def max_prob(logits: Tensor, gates: Tensor | None = None) -> Scores:
    conf, pred = _probs(logits).max(-1)
    return Scores(conf, pred, ">=")


@register_policy("entropy")
@per_exit
def entropy(logits: Tensor, gates: Tensor | None = None) -> Scores:
    logp = F.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).nan_to_num().sum(-1)  # 0 log 0 = 0
    return Scores(h, logits.argmax(-1), "<")


@register_policy("margin")
@per_exit
def margin(logits: Tensor, gates: Tensor | None = None) -> Scores:
    top = _probs(logits).topk(2, dim=-1).values
    return Scores(top[..., 0] - top[..., 1], logits.argmax(-1), ">=")


def _need_gates(name: str, gates: Tensor | None, logits: Tensor) -> Tensor:
    if gates is None:
        raise ValueError(f"policy {name!r} needs gates (a network with gated exits)")
    if gates.shape != logits.shape[:2]:
        raise ValueError(f"gates must be [E, N] = {tuple(logits.shape[:2])}, got {tuple(gates.shape)}")
    return gates.float()


@register_policy("gate")
@per_exit
def gate(logits: Tensor, gates: Tensor | None = None) -> Scores:
    return Scores(_need_gates("gate", gates, logits), logits.argmax(-1), ">")


@register_policy("cumulative")
def cumulative(logits: Tensor, gates: Tensor | None = None) -> Scores:
    pi = stick_breaking(_need_gates("cumulative", gates, logits))
    return Scores(pi.cumsum(0), logits.argmax(-1), ">=")


@register_policy("patience")
def patience(logits: Tensor, gates: Tensor | None = None) -> Scores:
    pred = logits.argmax(-1)
    same = torch.zeros_like(pred, dtype=torch.bool)
    same[1:] = pred[1:] == pred[:-1]
    # counter = length of the run of agreements ending at each exit: i - (last reset index).
    idx = torch.arange(pred.shape[0], device=pred.device)[:, None].expand_as(pred)
    last_reset = torch.where(same, torch.zeros_like(idx), idx).cummax(0).values
    return Scores((idx - last_reset).float(), pred, ">=")


@register_policy("ensemble")
def ensemble(logits: Tensor, gates: Tensor | None = None, *, probs: Tensor | None = None,
             weights: Tensor | None = None, ensemble=None) -> Scores:
    if sum(x is not None for x in (probs, weights, ensemble)) != 1:
        raise ValueError("policy 'ensemble' needs exactly one of probs=[E, N, C], weights=[E] (AEP) "
                         "or ensemble=GeometricEnsemble or {'weight', 'bias'} (ZTW)")
    if weights is not None:
        probs = ensemble_so_far(logits, weights)
    elif ensemble is not None:
        w, b = (ensemble.weight, ensemble.bias) if isinstance(ensemble, torch.nn.Module) else \
            (ensemble["weight"], ensemble["bias"])
        with torch.no_grad():
            probs = _probs(geometric_ensemble(logits, w, b))
    if probs.shape != logits.shape:
        raise ValueError(f"ensembled probs must match the logits {tuple(logits.shape)}, got {tuple(probs.shape)}")
    probs = probs.float()
    conf, pred = probs.max(-1)
    return Scores(conf, pred, ">=", probs)


# --- the same rules one exit at a time (what the engine runs) ------------------------------
#
# ``step(carry, logits_k [n, C], gate_k [n] | None, k) -> (Scores of exit k ([n] each), carry)``.
# ``carry`` is what the rule remembers of the exits before ``k``: None or a tuple of tensors with
# the samples first, so the exit loop can drop finished samples from it. Each step computes exit
# k's score with the same operations, in the same order and precision, as the rule on all
# exits at once, so on the CPU the scores are the same floats and the decisions match exactly
# (tested for every rule). On CUDA, whose cumulative sums accumulate in float32, they can differ
# in the last bit, which changes a decision only for a score on its threshold.

Step = Callable[[tuple | None, Tensor, Tensor | None, int], tuple[Scores, tuple | None]]


def exit_step(policy: str | Policy, num_exits: int, **options) -> Step | None:
    """The rule as a function of one exit at a time, or None when it has no such form (then
    :func:`padded_step` re-runs it on all outputs so far). Options are those of the rule."""
    fn = get_policy(policy)
    if getattr(fn, "per_exit", False):
        def step(carry, logits, gates, k):
            s = fn(logits[None], None if gates is None else gates[None], **options)
            return Scores(s.score[0], s.prediction[0], s.rule), None
        return step
    make = getattr(fn, "make_step", None)
    return make(num_exits, **options) if make is not None else None


def _cumulative_step(num_exits: int) -> Step:
    # torch's CPU cumprod / cumsum of float32 accumulate in float64 and round each output: the
    # running product and sum are carried in float64 likewise, so every score is the same float.
    def step(carry, logits, gates, k):
        g = _need_gates("cumulative", gates[None] if gates is not None else None, logits[None])[0]
        if k == num_exits - 1:
            g = torch.ones_like(g)  # stick_breaking: the last gate counts as 1
        survive, total = carry if carry is not None else (torch.ones_like(g, dtype=torch.float64), None)
        pi = g * survive.float()  # stick_breaking: g_k * prod_{j<k}(1 - g_j), each factor a float32
        total = pi.double() if total is None else total + pi
        return Scores(total.float(), logits.argmax(-1), ">="), (survive * (1 - g), total)
    return step


def _patience_step(num_exits: int) -> Step:
    def step(carry, logits, gates, k):
        pred = logits.argmax(-1)
        if carry is None:
            count = torch.zeros(pred.shape, dtype=torch.float32, device=pred.device)
        else:
            last, count = carry
            count = torch.where(pred == last, count + 1, torch.zeros_like(count))
        return Scores(count, pred, ">="), (pred, count)
    return step


def _ensemble_step(num_exits: int, *, probs=None, weights=None, ensemble=None) -> Step | None:
    if weights is None or probs is not None or ensemble is not None:
        return None  # a ZTW ensemble weighs every exit so far anew at each exit: no running form
    w = torch.as_tensor(weights, dtype=torch.float32)
    ensemble_so_far(torch.zeros(num_exits, 1, 1), w)  # the weights' checks, once, not at every step
    tiny = torch.finfo(torch.float32).tiny
    wf = [float(v) for v in w]  # Python floats: no host-to-device copy per step (a CUDA graph can hold the step)

    def step(carry, logits, gates, k):
        # ensemble_so_far's cumsums accumulate in float64 on the CPU: so do these running sums.
        wk = wf[k]
        num = wk * F.softmax(logits.float(), dim=-1)
        if carry is not None:
            num, den = carry[0] + num, carry[1] + wk
        else:
            num, den = num.double(), torch.full((logits.shape[0],), wk, dtype=torch.float64, device=logits.device)
        p = num.float() / den.float().clamp_min(tiny)[:, None]
        conf, pred = p.max(-1)
        return Scores(conf, pred, ">=", p), (num, den)
    return step


cumulative.make_step = _cumulative_step
patience.make_step = _patience_step
ensemble.make_step = _ensemble_step


def padded_step(policy: str | Policy, num_exits: int, **options) -> Step:
    """Any rule one exit at a time: the carry keeps every exit's logits (and gates) so far,
    samples first; at exit ``k`` the rule runs on them padded to all ``E`` exits (zero logits,
    unit gates) and row ``k`` is read. Every rule is causal (exit ``k``'s score depends on exits
    ``<= k`` only), so the row is the rule's own."""
    fn = get_policy(policy)

    def step(carry, logits, gates, k):
        lg = logits.float()[:, None]
        g = None if gates is None else gates.float()[:, None]
        if carry is not None:
            lg = torch.cat([carry[0], lg], 1)
            g = None if g is None else torch.cat([carry[1], g], 1)
        n, c = lg.shape[0], lg.shape[-1]
        full = torch.zeros(num_exits, n, c, device=lg.device)
        full[: k + 1] = lg.transpose(0, 1)
        gfull = None
        if g is not None:
            gfull = torch.ones(num_exits, n, device=lg.device)
            gfull[: k + 1] = g.t()
        s = fn(full, gfull, **options)
        probs = None if s.probs is None else s.probs[k]
        return Scores(s.score[k], s.prediction[k], s.rule, probs), (lg,) if g is None else (lg, g)
    return step


# --- thresholds and the vectorised routing (calibration's search) --------------------------

def as_thresholds(thresholds: Tensor | float | list, num_exits: int) -> Tensor:
    """``[E-1]`` float thresholds from a scalar (the same for every exit) or a sequence."""
    th = threshold_tensor(thresholds)
    if th.dim() == 0:
        th = th.expand(num_exits - 1)
    if th.shape != (num_exits - 1,):
        raise ValueError(f"need one threshold per non-final exit ({num_exits - 1}), got shape {tuple(th.shape)}")
    return th


def threshold_tensor(thresholds) -> Tensor:
    """Thresholds as a float32 tensor (a scalar or one per exit), refusing what is not numbers
    and NaN (``inf`` is a threshold: never fires; ``-inf``: always fires)."""
    if isinstance(thresholds, (str, bytes)) or (isinstance(thresholds, (list, tuple))
                                                and any(isinstance(v, (str, bytes)) for v in thresholds)):
        raise TypeError(f"thresholds are numbers (one for every exit, or one per non-final exit), got {thresholds!r}")
    try:
        th = torch.as_tensor(thresholds, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"thresholds are numbers (one for every exit, or one per non-final exit), got "
                        f"{type(thresholds).__name__} {str(thresholds)[:60]}") from None
    if th.dim() > 1:
        raise ValueError(f"thresholds are a number or one per non-final exit (1-D), got shape {tuple(th.shape)}")
    if bool(th.isnan().any()):
        raise ValueError(f"thresholds must not be NaN (inf: never exit there, -inf: always), got {th.tolist()}")
    return th


def canonical(score: Tensor, thresholds: Tensor, rule: str) -> tuple[Tensor, Tensor, bool]:
    """The same comparison with "higher fires": ``(score', thresholds', strict)`` such that
    ``score <rule> th`` iff ``score' > th'`` (strict) or ``score' >= th'``."""
    if rule in ("<", "<="):
        return -score, -thresholds, rule == "<"
    return score, thresholds, rule == ">"


def route(score: Tensor, thresholds: Tensor, rule: str, *, fallback: str = "final") -> tuple[Tensor, Tensor]:
    """``(exit, depth)`` per sample from scores ``[E, N]`` and thresholds ``[..., E-1]`` (leading
    dimensions, e.g. a batch of candidate threshold vectors, broadcast to ``[..., N]``).

    A sample leaves at the first non-final exit whose score fires; otherwise at the final exit
    (``fallback="final"``) or, with ``fallback="most_confident"`` (SDN), it is answered by the exit
    with the best score among all (the earliest on ties) while its cost stays the whole network
    (``depth = E-1``)."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be 'final' or 'most_confident', got {fallback!r}")
    e = score.shape[0]
    s, th, strict = canonical(score.float(), thresholds.to(score.device, torch.float32), rule)
    s_early, th = s[:-1], th.unsqueeze(-1)  # [E-1, N] vs [..., E-1, 1]
    fire = s_early > th if strict else s_early >= th  # [..., E-1, N]
    index = torch.arange(e - 1, device=score.device)[:, None]
    depth = torch.where(fire, index, e - 1).min(-2).values  # the first that fires, else E-1
    if fallback == "final":
        return depth, depth
    best = s.argmax(0).expand_as(depth)  # ties -> the earliest (argmax returns the first maximum)
    return torch.where(depth < e - 1, depth, best), depth
