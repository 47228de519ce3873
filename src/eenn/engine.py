"""Dynamic inference: run the network segment by segment and carry on only the samples that
have not exited yet (batch compaction), so the skipped computation is really skipped, at any
batch size, on CPU and CUDA.

At exit ``k`` the policy's rule is evaluated on the outputs computed so far, padded to all
``E`` exits (every rule is causal: exit ``k``'s score depends on exits ``<= k`` only), so the
engine makes, sample for sample, the decision :func:`eenn.policies.decide` makes on cached
outputs. Networks must be in eval mode (BatchNorm then does not depend on the batch make-up).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .inference import OptimizedSegments
from .network import MultiExitNetwork
from .policies.rules import as_thresholds, canonical, exit_step, get_policy
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
    backbone in the same pieces, the fair baseline for timing.

    ``optimize=True``: run each segment (and :meth:`static`) traced, frozen and optimised for
    inference (:class:`eenn.inference.OptimizedSegments`: BatchNorm folded, ReLU and adds fused,
    oneDNN's layout kept between convolutions on CPU), built on first use; single samples stay
    eager (tracing does not pay at batch 1). Outputs then agree with the eager network to float
    rounding, not bit for bit."""

    def __init__(self, net: MultiExitNetwork, policy: str, thresholds, *, fallback: str = "final",
                 micro_batch: int | None = None, optimize: bool = False, **policy_options) -> None:
        if "probs" in policy_options:
            raise ValueError("the engine computes ensembles itself: give weights= or ensemble=, not probs=")
        if fallback not in ("final", "most_confident"):
            raise ValueError(f"fallback must be 'final' or 'most_confident', got {fallback!r}")
        self.net = net.eval()
        self.policy = get_policy(policy)
        # Checked once here: the loop below calls the rule directly, once per exit and batch.
        check_options(f"policy {policy!r}", self.policy, policy_options, skip=("logits", "gates"))
        self.options = policy_options
        self.fallback = fallback
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch must be a positive number of samples or None, got {micro_batch}")
        self.micro_batch = micro_batch
        self.thresholds = as_thresholds(thresholds, net.num_exits)
        self._th_list = self.thresholds.detach().tolist()
        # The rule one exit at a time when it has that form (all built-in rules but a ZTW
        # ensemble); otherwise it is re-run on all outputs so far, padded to E, at every exit.
        self._step = exit_step(self.policy, net.num_exits, **policy_options)
        self.dynamic_macs = torch.tensor(net.cost().dynamic_macs, dtype=torch.float64)
        self._macs_list = self.dynamic_macs.tolist()
        self.optimized = OptimizedSegments(self.net) if optimize else None
        # What runs segment k (``(state, logits, gate)``, as MultiExitNetwork.forward_segment).
        self.forward_segment = self.optimized.forward_segment if optimize else self.net.forward_segment
        self._backbone = self.optimized.backbone if optimize else self.net.backbone

    def _segment(self, k: int, state, prev: Tensor | None, n: int):
        """Segment ``k`` on the ``n`` samples still running, in pieces of at most ``micro_batch``
        (the survivors of every piece are merged again before the next segment)."""
        mb = self.micro_batch
        if mb is None or n <= mb:
            return self.forward_segment(k, state, prev)
        parts = [self.forward_segment(k, _rows(state, a, a + mb), None if prev is None else prev[a:a + mb])
                 for a in range(0, n, mb)]
        states = [p[0] for p in parts]
        st = tuple(torch.cat(t) for t in zip(*states)) if isinstance(states[0], tuple) else torch.cat(states)
        lg = torch.cat([p[1] for p in parts])
        g = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
        return st, lg, g

    def _one(self, x: Tensor) -> EngineResult:
        """One sample, a rule with a one-exit form and the final fallback (the latency case): the
        same decisions as the batched loop, with Python scalars instead of index bookkeeping."""
        net, E, th, step = self.net, self.net.num_exits, self._th_list, self._step
        state, prev, carry = x, None, None
        for k in range(E):
            state, lg, g = self.forward_segment(k, state, prev if net.cascades else None)
            prev = lg
            s, carry = step(carry, lg, g, k)
            if k == E - 1:
                break
            sc, t, strict = canonical(s.score.item(), th[k], s.rule)  # the step's one host sync
            if sc > t if strict else sc >= t:
                break
        depth = torch.full((1,), k, dtype=torch.long, device=x.device)
        return EngineResult(s.prediction, depth, depth, torch.full((1,), self._macs_list[k], dtype=torch.float64,
                                                                   device=x.device))

    @torch.no_grad()
    def static(self, x: Tensor) -> Tensor:
        """The static backbone's logits on ``x``, in the same micro-batches: the fair baseline."""
        bb = self._backbone
        if self.micro_batch is None or len(x) <= self.micro_batch:
            return bb(x)
        return torch.cat([bb(c) for c in x.split(self.micro_batch)])

    @torch.no_grad()
    def __call__(self, x: Tensor) -> EngineResult:
        net, E = self.net, self.net.num_exits
        if net.training:
            raise RuntimeError("put the network in eval mode: training-mode BatchNorm mixes samples")
        dev, B = x.device, x.shape[0]
        step = self._step
        if B == 1 and step is not None and self.fallback == "final":
            return self._one(x)
        pred = torch.empty(B, dtype=torch.long, device=dev)
        exit_ = torch.empty(B, dtype=torch.long, device=dev)
        depth = torch.empty(B, dtype=torch.long, device=dev)
        alive = torch.arange(B, device=dev)  # original positions of the samples still running
        # Without a one-exit form the rule sees all outputs so far, padded to E; SDN's fallback
        # compares every exit's score, so those are kept (compacted like everything else).
        logits = None if step is not None else torch.zeros(E, B, net.num_classes, device=dev)
        gates = None if step is not None or not net.has_gates else torch.ones(E, B, device=dev)
        keep_all = step is not None and self.fallback == "most_confident"
        scores = torch.zeros(E, B, device=dev) if keep_all else None
        answers = torch.zeros(E, B, dtype=torch.long, device=dev) if keep_all else None
        th = self._th_list  # floats: comparing with a float makes no tensor
        state, prev, carry, n = x, None, None, B
        for k in range(E):
            state, lg, g = self._segment(k, state, prev if net.cascades else None, n)
            prev = lg
            if step is not None:
                s, carry = step(carry, lg, g, k)
                score, answer = s.score, s.prediction
                if keep_all:
                    scores[k], answers[k] = score, answer
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
            carry = _take(carry, stay) if carry is not None else None
            if logits is not None:
                logits = logits.index_select(1, stay)
                gates = gates.index_select(1, stay) if gates is not None else None
            if keep_all:
                scores, answers = scores.index_select(1, stay), answers.index_select(1, stay)
        if n:
            if self.fallback == "final":
                pred[alive], exit_[alive] = answer, E - 1
            else:  # SDN: the most confident exit among all (the earliest on ties)
                all_scores, all_answers = (scores, answers) if keep_all else (s.score, s.prediction)
                sc, _, _ = canonical(all_scores, torch.zeros(E), s.rule)
                best = sc.argmax(0)
                pred[alive], exit_[alive] = all_answers.gather(0, best[None]).squeeze(0), best
            depth[alive] = E - 1
        return EngineResult(pred, exit_, depth, self.dynamic_macs.to(dev)[depth])
