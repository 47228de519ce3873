"""Dynamic inference: run the network segment by segment and carry on only the samples that
have not exited yet (batch compaction), so the skipped computation is really skipped, at any
batch size, on CPU and CUDA.

At exit ``k`` the policy's rule is evaluated on the outputs computed so far, padded to all
``E`` exits (every rule is causal: exit ``k``'s score depends on exits ``<= k`` only), so the
engine makes, sample for sample, the decision :func:`eenn.policies.decide` makes on cached
outputs. Networks must be in eval mode (BatchNorm then does not depend on the batch make-up).
"""
from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from torch import Tensor

from .network import MultiExitNetwork
from .policies.rules import as_thresholds, canonical, get_policy
from .registry import check_options

__all__ = ["DynamicEngine", "EngineResult"]


class EngineResult(NamedTuple):
    prediction: Tensor  # [B]
    exit: Tensor  # [B] the exit whose answer is given
    depth: Tensor  # [B] the deepest exit computed (== exit unless SDN's fallback answered)
    macs: Tensor  # [B] MACs spent on the sample (heads on the way included)


def _rows(state, start: int, stop: int):
    """Rows ``start:stop`` of a state, as views."""
    return tuple(t[start:stop] for t in state) if isinstance(state, tuple) else state[start:stop]


def _take(state, idx: Tensor):
    """Rows ``idx`` of a state (a tensor or a tuple of tensors)."""
    return tuple(t.index_select(0, idx) for t in state) if isinstance(state, tuple) else state.index_select(0, idx)


class DynamicEngine:
    """``DynamicEngine(net, "max_prob", thresholds)(x) -> EngineResult``.

    ``policy_options`` go to the rule (``weights=`` for AEP ensembles, ``ensemble=`` for a ZTW
    geometric ensemble); ``fallback="most_confident"`` is SDN's rule for samples no exit took.

    ``micro_batch``: run each segment on at most this many samples at a time (the survivors of
    all pieces are merged before the next segment). On CPUs, large batches of high-resolution
    features fall out of cache; pieces of 32-64 keep the early stages as fast per sample as the
    late ones. Results do not depend on it (eval mode). :meth:`static` runs the static
    backbone in the same pieces, the fair baseline for timing."""

    def __init__(self, net: MultiExitNetwork, policy: str, thresholds, *, fallback: str = "final",
                 micro_batch: int | None = None, **policy_options) -> None:
        if "probs" in policy_options:
            raise ValueError("the engine computes ensembles itself: give weights= or ensemble=, not probs=")
        if fallback not in ("final", "most_confident"):
            raise ValueError(f"fallback must be 'final' or 'most_confident', got {fallback!r}")
        self.net = net.eval()
        self.policy = get_policy(policy)
        # Checked once here: the loop below calls the rule directly, once per exit and batch.
        check_options(f"policy {policy!r}", self.policy, policy_options, skip=("logits", "gates"))
        if policy_options.get("weights") is not None and "check" in inspect.signature(self.policy).parameters:
            # AEP weights: validate them once here (a clear error), not at every exit of every batch
            from .objectives.aep import ensemble_so_far

            w = torch.as_tensor(policy_options["weights"], dtype=torch.float32)
            ensemble_so_far(torch.zeros(net.num_exits, 1, net.num_classes), w)
            policy_options = {**policy_options, "weights": w, "check": False}
        self.options = policy_options
        self.fallback = fallback
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch must be a positive number of samples or None, got {micro_batch}")
        self.micro_batch = micro_batch
        self.thresholds = as_thresholds(thresholds, net.num_exits)
        self._th_list = self.thresholds.detach().tolist()
        self._alone = bool(getattr(self.policy, "per_exit", False)) and fallback == "final"
        self.dynamic_macs = torch.tensor(net.cost().dynamic_macs, dtype=torch.float64)

    def _segment(self, k: int, state, prev: Tensor | None, n: int):
        """Segment ``k`` on the ``n`` samples still running, in pieces of at most ``micro_batch``
        (the survivors of every piece are merged again before the next segment)."""
        mb = self.micro_batch
        if mb is None or n <= mb:
            return self.net.forward_segment(k, state, prev)
        parts = [self.net.forward_segment(k, _rows(state, a, a + mb), None if prev is None else prev[a:a + mb])
                 for a in range(0, n, mb)]
        states = [p[0] for p in parts]
        st = tuple(torch.cat(t) for t in zip(*states)) if isinstance(states[0], tuple) else torch.cat(states)
        lg = torch.cat([p[1] for p in parts])
        g = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
        return st, lg, g

    def _one(self, x: Tensor) -> EngineResult:
        """One sample and a per-exit rule (the latency case): the same decisions as the batched
        loop, with Python scalars instead of index bookkeeping (a few tensor ops fewer per exit)."""
        net, E, th = self.net, self.net.num_exits, self._th_list
        state, prev = x, None
        for k in range(E):
            state, lg, g = net.forward_segment(k, state, prev if net.cascades else None)
            prev = lg
            s = self.policy(lg[None], None if g is None else g[None], **self.options)
            if k == E - 1:
                break
            sc, t, strict = canonical(float(s.score[0, 0]), th[k], s.rule)  # the step's one host sync
            if sc > t if strict else sc >= t:
                break
        depth = torch.full((1,), k, dtype=torch.long, device=x.device)
        return EngineResult(s.prediction[0], depth, depth, self.dynamic_macs.to(x.device)[depth])

    def static(self, x: Tensor) -> Tensor:
        """The static backbone's logits on ``x``, in the same micro-batches: the fair baseline."""
        bb = self.net.backbone
        if self.micro_batch is None or len(x) <= self.micro_batch:
            return bb(x)
        return torch.cat([bb(c) for c in x.split(self.micro_batch)])

    @torch.no_grad()
    def __call__(self, x: Tensor) -> EngineResult:
        net, E = self.net, self.net.num_exits
        if net.training:
            raise RuntimeError("put the network in eval mode: training-mode BatchNorm mixes samples")
        dev, B = x.device, x.shape[0]
        if B == 1 and self._alone:
            return self._one(x)
        pred = torch.empty(B, dtype=torch.long, device=dev)
        exit_ = torch.empty(B, dtype=torch.long, device=dev)
        depth = torch.empty(B, dtype=torch.long, device=dev)
        alive = torch.arange(B, device=dev)  # original positions of the samples still running
        # A per-exit rule (max_prob, entropy, margin, gate) scores each exit alone; the others
        # (and SDN's fallback, which compares every exit) see all outputs so far, padded to E.
        alone = self._alone
        logits = None if alone else torch.zeros(E, B, net.num_classes, device=dev)
        gates = None if alone or not net.has_gates else torch.ones(E, B, device=dev)
        th = self._th_list  # floats: comparing with a float makes no tensor
        state, prev, n = x, None, B
        for k in range(E):
            state, lg, g = self._segment(k, state, prev if net.cascades else None, n)
            prev = lg
            if alone:
                s = self.policy(lg[None], None if g is None else g[None], **self.options)
                score, answer = s.score[0], s.prediction[0]
            else:
                logits[k] = lg.float()
                if gates is not None:
                    gates[k] = g.float()
                s = self.policy(logits, gates, **self.options)
                score, answer = s.score[k], s.prediction[k]
            if k == E - 1:
                break
            sc, t, strict = canonical(score, th[k], s.rule)
            fire = sc > t if strict else sc >= t
            n_fire = int(fire.sum())  # the one host sync of the step
            if n_fire == 0:
                continue
            if n_fire == n:  # everyone still running leaves here: no compaction needed
                pred[alive], exit_[alive], depth[alive] = answer, k, k
                n = 0
                break
            leave, stay = fire.nonzero().squeeze(1), (~fire).nonzero().squeeze(1)
            done = alive[leave]
            pred[done], exit_[done], depth[done] = answer[leave], k, k
            alive, state, prev, n = alive[stay], _take(state, stay), prev.index_select(0, stay), n - n_fire
            if logits is not None:
                logits = logits.index_select(1, stay)
                gates = gates.index_select(1, stay) if gates is not None else None
        if n:
            if self.fallback == "final":
                pred[alive], exit_[alive] = answer, E - 1
            else:  # SDN: the most confident exit among all (the earliest on ties)
                sc, _, _ = canonical(s.score, torch.zeros(E), s.rule)
                best = sc.argmax(0)
                pred[alive], exit_[alive] = s.prediction.gather(0, best[None]).squeeze(0), best
            depth[alive] = E - 1
        return EngineResult(pred, exit_, depth, self.dynamic_macs.to(dev)[depth])
