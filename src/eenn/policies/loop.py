"""The exit loop: the one implementation of "run segment k on the samples still running, score
exit k, let those that fire leave, carry the rest on".

Everything that makes early-exit decisions runs it: the PyTorch engine (:class:`eenn.engine.
DynamicEngine`), the onnxruntime runner and the serving tiers (:class:`eenn.staged.StagedRunner`),
and the simulation on cached outputs (:func:`decide`, :func:`evaluate_policy`). They differ only
in the ``segment`` function they give it:

    segment(k, state, prev_logits) -> (state, logits [n, C], gate [n] | None)

``state`` is whatever the segment hands on (a tensor or a tuple of tensors, samples first; for
the cached simulation, the samples' indices into the cache). The loop compacts the state, the
previous exit's logits (which cascading heads read), the rule's memory of earlier exits and, for
SDN's ``most_confident`` fallback, every exit's score and answer so far, so that only running
samples are computed. What is left after a range of segments is a :class:`Running`, which one
serving tier hands to the next (:meth:`Running.to_arrays`) and which a stream of batches pools
with the survivors of other batches (:meth:`Running.cat`, :meth:`Running.split`), its indices
then sample ids across the stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .policy import BoundPolicy, ExitPolicy, as_policy
from .rules import canonical, route

__all__ = ["Running", "Answers", "run_exits", "start", "Decision", "decide", "simulate_segment"]

Segment = Callable[[int, Any, "Tensor | None"], tuple[Any, Tensor, "Tensor | None"]]


def _take(x, idx: Tensor):
    """Rows ``idx`` of a tensor or a tuple of tensors (None stays None)."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(None if t is None else t.index_select(0, idx) for t in x)
    return x.index_select(0, idx)


def _slice(x, a: int, b: int):
    """Rows ``a:b`` of a tensor or a tuple of tensors (None stays None)."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(None if t is None else t[a:b] for t in x)
    return x[a:b]


def _cat(parts: list):
    """A tensor or a tuple of tensors (None stays None) joined along the samples."""
    first = parts[0]
    if first is None or isinstance(first, tuple):
        if any((p is None) != (first is None) for p in parts):
            raise ValueError("cannot join pieces where a field is set in some and None in others")
        if first is None:
            return None
        return tuple(None if ts[0] is None else torch.cat(ts) for ts in zip(*parts))
    return torch.cat(parts)


@dataclass
class Running:
    """The samples of a batch still running before segment ``next``."""

    next: int  # the next segment to run
    index: Tensor  # [n] long: positions in the original batch (in a stream: sample ids across it)
    state: Any  # what segment ``next`` takes: a tensor or a tuple of tensors, samples first
    batch: int  # size of the original batch (in a stream: the samples so far; index < batch)
    prev: Tensor | None = None  # [n, C] the logits of exit next-1
    carry: tuple | None = None  # the rule's memory of the exits before ``next``
    seen: tuple | None = None  # most_confident fallback: (scores [n, k], answers [n, k], probs [n, k, C] | None)
    last: tuple | None = None  # (prediction [n], probs [n, C] | None) of exit next-1: a degraded answer

    def __len__(self) -> int:
        return len(self.index)

    def take(self, idx: Tensor) -> "Running":
        return Running(self.next, self.index.index_select(0, idx), _take(self.state, idx), self.batch,
                       _take(self.prev, idx), _take(self.carry, idx), _take(self.seen, idx), _take(self.last, idx))

    def split(self, n: int) -> "tuple[Running, Running | None]":
        """The first ``n`` samples and the rest (None when nobody is left): views, no copies."""
        if n >= len(self):
            return self, None
        return self._rows(0, n), self._rows(n, len(self))

    def _rows(self, a: int, b: int) -> "Running":
        return Running(self.next, self.index[a:b], _slice(self.state, a, b), self.batch,
                       *(_slice(getattr(self, f), a, b) for f in ("prev", "carry", "seen", "last")))

    @classmethod
    def cat(cls, pieces: "list[Running]") -> "Running":
        """One Running of ``pieces`` (all before the same segment, their indices in one
        numbering, e.g. sample ids across a stream), every field joined along the samples."""
        if not pieces:
            raise ValueError("nothing to join")
        if len(pieces) == 1:
            return pieces[0]
        if len({p.next for p in pieces}) != 1:
            raise ValueError(f"cannot join samples before different segments {sorted({p.next for p in pieces})}")
        return cls(pieces[0].next, torch.cat([p.index for p in pieces]), _cat([p.state for p in pieces]),
                   max(p.batch for p in pieces),
                   *(_cat([getattr(p, f) for p in pieces]) for f in ("prev", "carry", "seen", "last")))

    # -- transport between tiers (named NumPy arrays, see eenn.serve.codec) --------------
    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, meta)``: the state as ``state_<i>``, the rest under fixed names."""
        state = self.state if isinstance(self.state, tuple) else (self.state,)
        arrays = {f"state_{i}": _np(s) for i, s in enumerate(state)}
        arrays["index"] = _np(self.index)
        groups = {"carry": self.carry, "seen": self.seen, "last": self.last}
        meta: dict[str, Any] = {"next_segment": self.next, "batch": self.batch,
                                "state_tuple": isinstance(self.state, tuple)}
        if self.prev is not None:
            arrays["prev"] = _np(self.prev)
        for name, group in groups.items():
            if group is not None:
                meta[name] = [t is not None for t in group]
                for i, t in enumerate(group):
                    if t is not None:
                        arrays[f"{name}_{i}"] = _np(t)
        return arrays, meta

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "Running":
        n_state = sum(1 for k in arrays if k.startswith("state_"))
        state = tuple(torch.from_numpy(arrays[f"state_{i}"]) for i in range(n_state))
        if not meta.get("state_tuple"):
            state = state[0]

        def group(name):
            present = meta.get(name)
            if present is None:
                return None
            return tuple(torch.from_numpy(arrays[f"{name}_{i}"]) if p else None for i, p in enumerate(present))

        prev = torch.from_numpy(arrays["prev"]) if "prev" in arrays else None
        return cls(int(meta["next_segment"]), torch.from_numpy(arrays["index"]), state, int(meta["batch"]), prev,
                   group("carry"), group("seen"), group("last"))


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def start(x, batch: int | None = None, *, offset: int = 0) -> Running:
    """A batch of model inputs (a tensor, or a tuple of tensors) before segment 0; in a stream,
    ``offset`` is the id of its first sample (the samples before it)."""
    first = x[0] if isinstance(x, tuple) else x
    b = first.shape[0] if batch is None else batch
    return Running(0, torch.arange(offset, offset + b, device=first.device), x, offset + b)


@dataclass
class Answers:
    """The samples that left, in chunks (one per exit that answered): positions in the original
    batch, prediction, the exit that answered, the depth computed (== exit unless SDN's fallback
    answered) and, when asked for, the answering probabilities; ``degraded`` marks answers given
    by a shallower exit because the rest of the network was unreachable."""

    index: list[Tensor] = field(default_factory=list)
    prediction: list[Tensor] = field(default_factory=list)
    exit: list[Tensor] = field(default_factory=list)
    depth: list[Tensor] = field(default_factory=list)
    probs: list[Tensor] = field(default_factory=list)
    degraded: list[Tensor] = field(default_factory=list)

    def add(self, index: Tensor, prediction: Tensor, exit_: Tensor | int, depth: Tensor | int, probs: Tensor | None,
            degraded: bool = False) -> None:
        n = len(index)
        self.index.append(index)
        self.prediction.append(prediction)
        self.exit.append(exit_ if isinstance(exit_, Tensor) else torch.full((n,), exit_, dtype=torch.long,
                                                                            device=index.device))
        self.depth.append(depth if isinstance(depth, Tensor) else torch.full((n,), depth, dtype=torch.long,
                                                                             device=index.device))
        if probs is not None:
            self.probs.append(probs)
        self.degraded.append(torch.full((n,), degraded, dtype=torch.bool, device=index.device))

    def extend(self, other: "Answers") -> None:
        for name in ("index", "prediction", "exit", "depth", "probs", "degraded"):
            getattr(self, name).extend(getattr(other, name))

    def __len__(self) -> int:
        return sum(len(i) for i in self.index)

    def ordered(self, batch: int) -> dict[str, Tensor]:
        """Every field as one tensor in batch order; refuses a batch with unanswered samples (the
        loop answers each sample once, so counting them is the check: no device sync)."""
        idx = torch.cat(self.index) if self.index else torch.zeros(0, dtype=torch.long)
        if len(idx) != batch:
            raise RuntimeError(f"{batch - len(idx)} of {batch} samples have no answer")
        out = {}
        for name in ("prediction", "exit", "depth", "probs", "degraded"):
            chunks = getattr(self, name)
            if not chunks:
                continue
            v = torch.cat(chunks)
            o = torch.empty_like(v)
            o[idx] = v
            out[name] = o
        return out


def run_exits(bound: BoundPolicy, running: Running, segment: Segment, answers: Answers, *, stop: int | None = None,
              probs: bool = False) -> Running | None:
    """Run ``running`` through segments ``running.next .. stop-1`` (default: to the end) with
    ``bound``'s rule; the samples that leave go into ``answers``; returns the rest, or None when
    nobody is left. ``probs``: also record the answering probabilities (and keep a degraded
    answer ready in ``Running.last``)."""
    E, step, fallback = bound.num_exits, bound.step, bound.fallback
    stop = E if stop is None else min(stop, E)
    run = running
    for k in range(run.next, stop):
        state, lg, g = segment(k, run.state, run.prev)
        s, carry = step(run.carry, lg, g, k)
        p = bound.probs(s, lg) if probs else None
        seen = run.seen
        if fallback == "most_confident":
            sc = s.score.float()[:, None]
            ans = s.prediction[:, None]
            pp = p[:, None] if p is not None else None
            if seen is not None:
                sc, ans = torch.cat([seen[0], sc], 1), torch.cat([seen[1], ans], 1)
                pp = torch.cat([seen[2], pp], 1) if pp is not None else None
            seen = (sc, ans, pp)
        if k == E - 1:  # the final exit answers everyone left (or SDN's most confident exit)
            if fallback == "final":
                answers.add(run.index, s.prediction, E - 1, E - 1, p)
            else:
                c, _, _ = canonical(seen[0], torch.zeros(()), s.rule)
                best = c.argmax(1)  # the earliest on ties
                pred = seen[1].gather(1, best[:, None]).squeeze(1)
                pb = seen[2][torch.arange(len(best), device=best.device), best] if p is not None else None
                answers.add(run.index, pred, best, E - 1, pb)
            return None
        fire = bound.fires(s.score, k, s.rule)
        n, n_fire = len(run.index), int(fire.sum())  # the one host sync of the step
        if n_fire == n:  # everyone still running leaves here: no compaction
            answers.add(run.index, s.prediction, k, k, p)
            return None
        nxt = Running(k + 1, run.index, state, run.batch, lg, carry, seen,
                      (s.prediction, p) if probs else None)
        if n_fire:
            leave, stay = fire.nonzero().squeeze(1), (~fire).nonzero().squeeze(1)
            answers.add(run.index.index_select(0, leave), s.prediction.index_select(0, leave), k, k,
                        p.index_select(0, leave) if p is not None else None)
            nxt = nxt.take(stay)
        run = nxt
    return run


def degrade(running: Running, answers: Answers) -> None:
    """Answer every sample of ``running`` with the deepest exit already computed (the rest of the
    network is unreachable); the answers are flagged as degraded."""
    if running.last is None:
        raise ValueError("no exit has been computed for these samples yet; nothing to degrade to")
    pred, probs = running.last
    k = running.next - 1
    answers.add(running.index, pred, k, k, probs, degraded=True)


# --- the simulation on cached outputs ------------------------------------------------------

class Decision(NamedTuple):
    exit: Tensor  # [N] the exit whose answer is given
    prediction: Tensor  # [N]
    depth: Tensor  # [N] the deepest exit computed (what the sample costs); == exit unless a fallback answered


def simulate_segment(logits: Tensor, gates: Tensor | None) -> Segment:
    """A segment function over cached outputs ``[E, N, C]`` (and gates ``[E, N]``): the state is
    the samples' indices into the cache."""
    def segment(k, idx, prev):
        return idx, logits[k].index_select(0, idx), None if gates is None else gates[k].index_select(0, idx)
    return segment


def decide(policy: ExitPolicy | str, cached_or_logits, thresholds=None, *, gates: Tensor | None = None,
           fallback: str | None = None, **options) -> Decision:
    """Where each cached sample exits and what it answers, by the exit loop itself:
    ``decide(policy, cache)`` with an :class:`ExitPolicy`, or ``decide("max_prob", cache, th)``.
    ``cached_or_logits``: a :class:`~eenn.outputs.CachedOutputs` or logits ``[E, N, C]``."""
    logits = getattr(cached_or_logits, "logits", cached_or_logits)
    if gates is None:
        gates = getattr(cached_or_logits, "gates", None)
    bound = as_policy(policy, thresholds, fallback=fallback, **options).bind(logits.shape[0])
    n = logits.shape[1]
    if "probs" in bound.options:  # probabilities precomputed for the whole cache: no per-sample loop form
        s = bound.scores(logits, gates)
        exit_, depth = route(s.score, bound.thresholds, s.rule, fallback=bound.fallback)
        return Decision(exit_, s.prediction.gather(0, exit_[None]).squeeze(0), depth)
    answers = Answers()
    run_exits(bound, start(torch.arange(n)), simulate_segment(logits, gates), answers)
    out = answers.ordered(n)
    return Decision(out["exit"], out["prediction"], out["depth"])
