"""Fit per-exit thresholds on the validation cache to a goal; report the goal on the test cache.

Goals (:class:`Goal`, exactly one of):

- ``max_drop=delta``: the lowest expected dynamic MACs whose accuracy is at most ``delta`` below
  the final exit's (on the validation split).
- ``budget=M``: the best accuracy whose expected dynamic MACs are ``<= M`` per sample.
- ``msdnet_q=q``: MSDNet's budgeted exit distribution ``p_k ∝ q^k`` (k = 1..E, normalised),
  thresholds read off the sorted validation scores (METHODS.md §5).

The search for (a) and (b), all in "higher score fires" form (:func:`~.rules.canonical`):

1. Candidates per exit: all of that exit's distinct validation scores plus ``-inf`` (everyone
   fires) and ``+inf`` (nobody fires): every partition a threshold can make there.
2. A coordinate step tries *every* candidate of one exit with the others held, exactly and at
   once: a sample firing at that exit gets the outcome of "it always fires", the others that of
   "it never fires" (both computed by the same :func:`~.rules.route` that :func:`~.rules.decide`
   uses), so the totals for all candidates are suffix sums over the samples sorted by score,
   O(N log N) per step.
3. Starting points: two one-parameter families evaluated in one vectorised call (the same rank
   quantile at every exit, i.e. per-exit values; one shared value everywhere) and, for a range
   of exchange rates ``lam`` (MACs per correct sample), the coordinate-descent minimum of
   ``MACs - lam * correct`` from "nobody leaves early". The unconstrained descents trade cost
   between exits, which single moves under a hard constraint cannot.
4. The best starting point for the goal, refined by coordinate descent on the goal itself
   (moves taken only when strictly better, rounds until nothing changes), with pair moves
   (``pair_values`` rank-spaced values of one exit, each with a full step on another) once
   single moves are exhausted. The result is a local optimum, not a certified global one.

"Better" is lexicographic on exact integer counts: first the constraint violation (so an
infeasible start walks towards feasibility), then the objective (MACs for (a), correct samples
for (b)), then the other one. Ties keep the earliest candidate, so the result is deterministic.

Guarded ``max_drop`` (``Goal(max_drop=delta, alpha=a)``), learn-then-test style: the validation
cache is split in two by a seeded permutation. On the first half, the search above is run for
the drops ``delta * k / steps`` (k = 0..2*steps), giving a sequence of thresholds ordered from
the most to the least costly there. On the second half, fixed-sequence testing walks down that
sequence while the null "population drop > delta" is rejected at level ``a``: the empirical
Bernstein upper confidence bound (Maurer & Pontil) on the mean per-sample difference
``1[final right] - 1[policy right]`` is at most ``delta``. The last rejected thresholds are
returned, so that with probability >= 1 - a (over exchangeable validation and test draws) their
population drop is <= delta; if none is rejected, nobody exits early. The bound is
conservative: expect savings below the unguarded search, none at ``delta = 0``, and only a few
thousand validation samples make a drop of a few percent certifiable.
"""
from __future__ import annotations

import difflib
import math
import numbers
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Mapping

import torch
from torch import Tensor

from ..cost import CostTable
from ..outputs import CachedOutputs
from ..userframe import caller_stacklevel
from .loop import decide
from .oracle import captured_share, check_cost_table, oracle
from .policy import ExitPolicy, as_policy
from .rules import canonical, route

__all__ = ["Goal", "calibrate", "evaluate_policy", "report_goal", "msdnet_distribution"]

# Each goal field's valid values: (test, the range in words).
_GOAL_RANGES = {
    "max_drop": (lambda v: 0 <= v <= 1, "in [0, 1], a fraction of accuracy (0.01 for 1%)"),
    "budget": (lambda v: v > 0, "> 0, expected MACs per sample"),
    "msdnet_q": (lambda v: v > 0, "> 0, the ratio q of p_k ∝ q^k"),
    "tolerance": (lambda v: 0 <= v <= 1, "in [0, 1], a total-variation distance"),
    "alpha": (lambda v: 0 < v < 1, "in (0, 1), the guard's error level"),
}


@dataclass(frozen=True)
class Goal:
    max_drop: float | None = None
    budget: float | None = None
    msdnet_q: float | None = None
    tolerance: float | None = None  # (c) only (default 0.05): largest total-variation distance to the target on test
    alpha: float | None = None  # (a) only: guard the drop with confidence 1 - alpha (learn-then-test)

    def __post_init__(self) -> None:
        for key, (ok, allowed) in _GOAL_RANGES.items():
            v = getattr(self, key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"goal {key!r} must be a number {allowed}; got {v!r} ({type(v).__name__})")
            if not (math.isfinite(v) and ok(v)):
                raise ValueError(f"goal {key!r} must be a finite number {allowed}; got {v!r}")
        set_ = [k for k in ("max_drop", "budget", "msdnet_q") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"a goal needs exactly one of max_drop, budget, msdnet_q; got {set_ or 'none'}")
        if self.alpha is not None and self.max_drop is None:
            raise ValueError(f"goal 'alpha' guards a max_drop goal; got it with {set_[0]!r}")
        if self.msdnet_q is None and self.tolerance is not None:
            raise ValueError(f"goal 'tolerance' is the msdnet_q goal's allowed distance to its distribution; got it "
                             f"with {set_[0]!r}: leave it out")
        if self.msdnet_q is not None and self.tolerance is None:
            object.__setattr__(self, "tolerance", 0.05)

    @property
    def kind(self) -> str:
        return next(k for k in ("max_drop", "budget", "msdnet_q") if getattr(self, k) is not None)


def _as_goal(goal: Goal | Mapping) -> Goal:
    if isinstance(goal, Goal):
        return goal
    if not isinstance(goal, Mapping):
        raise TypeError(f"a goal is a Goal or a mapping such as {{'max_drop': 0.01}} or {{'budget': 2e6}}; "
                        f"got {goal!r} ({type(goal).__name__})")
    keys = [f.name for f in fields(Goal)]
    for k in goal:
        if k not in keys:
            close = difflib.get_close_matches(str(k), keys, n=1)
            raise ValueError(f"unknown goal key {k!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; goal keys: {', '.join(keys)}")
    return Goal(**goal)


def msdnet_distribution(q: float, num_exits: int) -> Tensor:
    """``p_k ∝ q^k`` for ``k = 1..E``, normalised (float64)."""
    k = torch.arange(1, num_exits + 1, dtype=torch.float64)
    p = torch.tensor(float(q), dtype=torch.float64) ** (k - (num_exits if q > 1 else 1))  # largest 1: no overflow
    return p / p.sum()


class _Search:
    """Exact integer accuracy and cost of threshold vectors on one cache, in canonical form."""

    def __init__(self, score: Tensor, strict: bool, correct: Tensor, cost: CostTable, fallback: str) -> None:
        self.score, self.strict, self.fallback = score, strict, fallback
        self.rule = ">" if strict else ">="
        self.correct = correct  # [E, N] bool
        self.samples = torch.arange(correct.shape[1])
        self.macs = torch.tensor(cost.dynamic_macs, dtype=torch.int64)
        inf = torch.tensor([math.inf])
        self.order = [row.argsort() for row in score[:-1]]
        self.cands = [torch.cat([-inf, torch.unique(row), inf]) for row in score[:-1]]  # ascending
        # for each candidate, the rank (in ascending score order) of the first sample that fires
        self.first = [torch.searchsorted(row[o], c, right=strict) for row, o, c in zip(score, self.order, self.cands)]

    def per_sample(self, th: Tensor) -> tuple[Tensor, Tensor]:
        exit_, depth = route(self.score, th, self.rule, fallback=self.fallback)
        return self.correct[exit_, self.samples].long(), self.macs[depth]

    def totals(self, th: Tensor) -> tuple[Tensor, Tensor]:
        """``(correct [K], macs [K])`` summed over samples, for thresholds ``[K, E-1]``."""
        c, m = self.per_sample(th)
        return c.sum(-1), m.sum(-1)

    def sweep(self, th: Tensor, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """Every candidate for exit ``i`` with the others held: ``(candidates, correct, macs)``.
        A sample that fires at exit ``i`` gets the outcome of "exit i always fires", the others that
        of "never fires" (the exits before ``i`` are the same in both), so the totals are suffix
        sums over the samples sorted by their score at ``i``: O(N log N) for all candidates."""
        t = th.clone()
        t[i] = math.inf
        cn, mn = self.per_sample(t)
        t[i] = -math.inf
        ca, ma = self.per_sample(t)
        zero = torch.zeros(1, dtype=torch.int64)

        def suffix(d):
            p = torch.cat([zero, d[self.order[i]].cumsum(0)])
            return p[-1] - p

        pos = self.first[i]
        return self.cands[i], cn.sum() + suffix(ca - cn)[pos], mn.sum() + suffix(ma - mn)[pos]

    def descend(self, th: Tensor, key, max_rounds: int, pair_values: int = 0) -> Tensor:
        """Coordinate descent on ``key(correct, macs) -> tuple of [K] tensors`` (lexicographic, smaller
        is better); a move is taken only when strictly better, ties keep the first candidate.
        When single moves are exhausted and ``pair_values`` > 0, pair moves: exit ``i`` set to one of
        ``pair_values`` rank-spaced candidates and every candidate of another exit ``j`` tried with it
        (a hard constraint often needs two exits to move together)."""
        c, m = self.totals(th[None])
        current = [k[0].item() for k in key(c, m)]

        def moves(pairs: bool):
            for i in range(len(th)):
                if not pairs:
                    yield th, i
                    continue
                cands = self.cands[i]
                for v in cands[torch.linspace(0, len(cands) - 1, min(pair_values, len(cands))).round().long()]:
                    base = th.clone()
                    base[i] = v
                    for j in range(len(th)):
                        if j != i:
                            yield base, j

        for _ in range(max_rounds):
            changed = False
            for pairs in (False, True) if pair_values else (False,):
                for base, j in moves(pairs):
                    cands, c, m = self.sweep(base, j)
                    keys = key(c, m)
                    k = _best(keys)
                    new = [x[k].item() for x in keys]
                    if new < current:
                        th, current, changed = base.clone(), new, True
                        th[j] = cands[k]
                if changed:
                    break  # back to single moves
            if not changed:
                break
        return th


def _best(keys) -> int:
    """Index of the lexicographic minimum of the key tensors; the first on ties."""
    keep = torch.ones_like(keys[0], dtype=torch.bool)
    for key in keys:
        big = torch.finfo(key.dtype).max if key.dtype.is_floating_point else torch.iinfo(key.dtype).max
        k = torch.where(keep, key, torch.full_like(key, big))
        keep &= k == k.min()
    return int(keep.to(torch.int8).argmax())


def calibrate(policy: ExitPolicy | str, val_cache: CachedOutputs, cost_table: CostTable, goal: Goal | Mapping, *,
              fallback: str | None = None, levels: int = 65, multipliers: int = 25, pair_values: int = 32,
              max_rounds: int = 20, seed: int = 0, steps: int = 5, **options) -> ExitPolicy:
    """``policy`` (an :class:`ExitPolicy`, or a rule name with ``fallback`` and rule ``options``
    such as ``weights=``) with per-exit thresholds fitted on ``val_cache`` to ``goal`` (see the
    module docstring for the search): the policy to give the engine, the export, the server."""
    goal = _as_goal(goal)
    check_cost_table(cost_table, "calibrate")
    pol = as_policy(policy, fallback=fallback, **options)
    fallback = pol.fallback
    e = val_cache.logits.shape[0]
    s = pol.bind(e, need_thresholds=False).scores(val_cache.logits, val_cache.gates)
    if cost_table.num_exits != e:
        raise ValueError(f"cost table has {cost_table.num_exits} exits, the cache {e}")
    sc, _, strict = canonical(s.score.float(), torch.zeros(e - 1), s.rule)
    back = (lambda t: -t) if s.rule in ("<", "<=") else (lambda t: t)

    if e == 1:  # no early exit (exits "none"): nothing to fit, every sample takes the final one
        return pol.replace(thresholds=torch.zeros(0))
    if goal.kind == "msdnet_q":
        target = msdnet_distribution(goal.msdnet_q, e)
        th = _msdnet(sc, strict, target)
        _warn_coarse(pol.name, sc, strict, th, target, goal)
    elif goal.alpha is not None:
        th = _guarded(sc, strict, s.prediction == val_cache.targets[None], cost_table, goal, fallback,
                      dict(levels=levels, multipliers=multipliers, pair_values=pair_values, max_rounds=max_rounds),
                      seed=seed, steps=steps)
    else:
        th = _search(_Search(sc, strict, s.prediction == val_cache.targets[None], cost_table, fallback), goal,
                     levels, multipliers, pair_values, max_rounds)
    return pol.replace(thresholds=back(th))


def _search(search: _Search, goal: Goal, levels: int, multipliers: int, pair_values: int, max_rounds: int) -> Tensor:
    e, n = search.correct.shape
    if goal.kind == "max_drop":
        n_min = math.ceil(n * (search.correct[-1].double().mean().item() - goal.max_drop) - 1e-9)

        def key(c, m):
            return (n_min - c).clamp_min(0), m, -c
    else:
        total = math.floor(goal.budget * n + 1e-9)

        def key(c, m):
            return (m - total).clamp_min(0), -c, m

    # 1. Starting points: the same rank quantile at every exit, and one shared value everywhere.
    lv = torch.linspace(0, 1, levels)
    starts = [torch.stack([c[(lv * (len(c) - 1)).round().long()] for c in search.cands], -1)]
    pooled = torch.unique(torch.cat(search.cands))
    pooled = pooled[torch.linspace(0, len(pooled) - 1, min(len(pooled), levels)).round().long()]
    starts.append(pooled[:, None].expand(-1, e - 1))
    # 2. Lagrangian descents: minimise MACs - lam * correct for a range of exchange rates lam,
    #    each from "nobody leaves early"; they move several exits together where (1) cannot.
    spread = float(search.macs.max() - search.macs.min()) or 1.0
    lams = torch.cat([torch.zeros(1, dtype=torch.float64),
                      spread * torch.logspace(-3, 3, multipliers, dtype=torch.float64)])
    never = torch.full((e - 1,), math.inf)
    for lam in lams.tolist():
        starts.append(search.descend(never, lambda c, m, lam=lam: (m.double() - lam * c.double(), -c), max_rounds)[None])
    starts = torch.cat(starts)
    # 3. The best of them for the goal, refined by constrained coordinate descent.
    th = starts[_best(key(*search.totals(starts)))]
    return search.descend(th, key, max_rounds, pair_values)


def _guarded(sc: Tensor, strict: bool, correct: Tensor, cost: CostTable, goal: Goal, fallback: str, search_args: dict,
             *, seed: int, steps: int) -> Tensor:
    """Learn-then-test for ``max_drop`` (module docstring)."""
    n = sc.shape[1]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, hold = perm[: n // 2], perm[n // 2:]
    learn = _Search(sc[:, fit], strict, correct[:, fit], cost, fallback)
    path = [_search(learn, Goal(max_drop=min(1.0, goal.max_drop * k / steps)), **search_args)
            for k in range(2 * steps + 1)]
    path = torch.stack(path)
    macs = learn.totals(path)[1]
    path = path[torch.sort(-macs, stable=True).indices]  # most costly (most careful) first
    test = _Search(sc[:, hold], strict, correct[:, hold], cost, fallback)
    right, _ = test.per_sample(path)  # [K, n_hold]
    # x = (d + 1) / 2 in [0, 1] with d = 1[final right] - 1[policy right]: E[d] = 2 E[x] - 1.
    x = (test.correct[-1].double() - right.double() + 1) / 2  # [K, n_hold]
    m = len(hold)
    log_term = math.log(2 / goal.alpha)
    ucb = x.mean(-1) + (2 * x.var(-1) * log_term / m).sqrt() + 7 * log_term / (3 * (m - 1))  # Maurer-Pontil
    chosen = torch.full((sc.shape[0] - 1,), math.inf)
    for th, u in zip(path, ucb.tolist()):
        if 2 * u - 1 > goal.max_drop:  # H0 "drop > delta" not rejected at level alpha: stop
            break
        chosen = th
    return chosen


def _msdnet(sc: Tensor, strict: bool, p: Tensor) -> Tensor:
    """MSDNet's thresholds: for each exit k < E in turn, among the samples still running, the
    score of the ``floor(N p_k)``-th most confident; everything at or above it leaves. Where
    fewer than that are still running (ties at an earlier exit let more leave there), nobody
    leaves at k, as in MSDNet's own code (its threshold stays at 1e8)."""
    e, n = sc.shape
    running = torch.ones(n, dtype=torch.bool)
    th = torch.full((e - 1,), math.inf)
    for k in range(e - 1):
        want = math.floor(n * p[k].item())
        alive = sc[k][running].sort(descending=True).values
        if 0 < want <= len(alive):
            v = alive[want - 1]
            th[k] = torch.nextafter(v, torch.tensor(-math.inf)) if strict else v
        running &= ~(sc[k] > th[k] if strict else sc[k] >= th[k])
    return th


def _warn_coarse(rule: str, sc: Tensor, strict: bool, th: Tensor, target: Tensor, goal: Goal) -> None:
    """Warn where the fitted thresholds miss the msdnet target on the very split they were fitted
    on: the rule's scores take too few values (ties, e.g. patience's counters) to split it so."""
    exits = route(sc, th, ">" if strict else ">=")[0]
    got = torch.bincount(exits, minlength=sc.shape[0]).double() / max(sc.shape[1], 1)
    if 0.5 * (got - target).abs().sum().item() <= goal.tolerance:
        return
    values = len(torch.unique(sc[:-1]))
    warnings.warn(f"calibrate: rule {rule!r}'s scores take {values} distinct values, too coarse for the msdnet_q="
                  f"{goal.msdnet_q:g} target {[round(v, 2) for v in target.tolist()]}: on the validation split the exits "
                  f"take {[round(v, 2) for v in got.tolist()]}", stacklevel=caller_stacklevel())


def evaluate_policy(policy: ExitPolicy, cache: CachedOutputs, cost_table: CostTable) -> dict:
    """Accuracy, expected dynamic MACs, speed-up over the static network (``macs[-1]``), exit
    distribution (by the exit that answers) and ``final_accuracy``, on ``cache``. The final
    accuracy is that of the policy's own answer at the final exit (for ``ensemble``, the full
    ensemble's), the reference of the ``max_drop`` goal."""
    check_cost_table(cost_table, "evaluate_policy")
    return _evaluate(as_policy(policy), cache, cost_table)[0]


def _evaluate(policy: ExitPolicy, cache: CachedOutputs, cost_table: CostTable) -> tuple[dict, Tensor]:
    e = cache.logits.shape[0]
    bound = policy.bind(e)
    s = bound.scores(cache.logits, cache.gates)
    d = decide(policy, cache)
    macs = torch.tensor(cost_table.dynamic_macs, dtype=torch.float64)[d.depth].mean().item()
    full = float(cost_table.macs[-1])
    return {
        "thresholds": bound.thresholds.tolist(),
        "accuracy": (d.prediction == cache.targets).double().mean().item(),
        "final_accuracy": (s.prediction[-1] == cache.targets).double().mean().item(),
        "expected_macs": macs,
        "full_macs": full,
        "speedup": full / macs if macs > 0 else math.inf,
        "exit_distribution": (torch.bincount(d.exit, minlength=e).double() / len(d.exit)).tolist(),
    }, s.prediction


def report_goal(policy: ExitPolicy, test_cache: CachedOutputs, cost_table: CostTable, goal: Goal | Mapping) -> dict:
    """:func:`evaluate_policy` on the test cache plus the goal, whether it held there
    (``goal_held``), the oracle's point (on the policy's own per-exit predictions) and the share
    of the oracle's saving captured."""
    goal = _as_goal(goal)
    check_cost_table(cost_table, "report_goal")
    r, predictions = _evaluate(as_policy(policy), test_cache, cost_table)
    if goal.kind == "max_drop":
        r["accuracy_drop"] = r["final_accuracy"] - r["accuracy"]
        held = r["accuracy_drop"] <= goal.max_drop + 1e-9
    elif goal.kind == "budget":
        held = r["expected_macs"] <= goal.budget * (1 + 1e-12)
    else:
        target = msdnet_distribution(goal.msdnet_q, cost_table.num_exits)
        r["target_distribution"] = target.tolist()
        r["distribution_error"] = 0.5 * (torch.tensor(r["exit_distribution"], dtype=torch.float64) - target).abs().sum().item()
        held = r["distribution_error"] <= goal.tolerance
    o = oracle(test_cache, cost_table, predictions=predictions)
    r.update(goal={k: v for k, v in asdict(goal).items() if v is not None}, goal_held=bool(held),
             oracle_accuracy=o["accuracy"], oracle_macs=o["expected_macs"],
             captured_share=captured_share(r["expected_macs"], o["expected_macs"], r["full_macs"]))
    return r
