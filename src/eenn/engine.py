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

from .network import MultiExitNetwork
from .policies.rules import as_thresholds, canonical, get_policy
from .registry import check_options

__all__ = ["DynamicEngine", "EngineResult"]


class EngineResult(NamedTuple):
    prediction: Tensor  # [B]
    exit: Tensor  # [B] the exit whose answer is given
    depth: Tensor  # [B] the deepest exit computed (== exit unless SDN's fallback answered)
    macs: Tensor  # [B] MACs spent on the sample (heads on the way included)


def _index(state, keep: Tensor):
    return tuple(t[keep] for t in state) if isinstance(state, tuple) else state[keep]


class DynamicEngine:
    """``DynamicEngine(net, "max_prob", thresholds)(x) -> EngineResult``.

    ``policy_options`` go to the rule (``weights=`` for AEP ensembles, ``ensemble=`` for a ZTW
    geometric ensemble); ``fallback="most_confident"`` is SDN's rule for samples no exit took."""

    def __init__(self, net: MultiExitNetwork, policy: str, thresholds, *, fallback: str = "final",
                 **policy_options) -> None:
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
        self.thresholds = as_thresholds(thresholds, net.num_exits)
        self.dynamic_macs = torch.tensor(net.cost().dynamic_macs, dtype=torch.float64)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> EngineResult:
        net, E = self.net, self.net.num_exits
        if net.training:
            raise RuntimeError("put the network in eval mode: training-mode BatchNorm mixes samples")
        dev, B = x.device, x.shape[0]
        pred = torch.empty(B, dtype=torch.long, device=dev)
        exit_ = torch.empty(B, dtype=torch.long, device=dev)
        depth = torch.empty(B, dtype=torch.long, device=dev)
        alive = torch.arange(B, device=dev)  # original positions of the samples still running
        logits = torch.zeros(E, B, net.num_classes, device=dev)  # outputs so far, compacted
        gates = torch.ones(E, B, device=dev) if net.has_gates else None
        th = self.thresholds.to(dev)
        state, prev = x, None
        for k in range(E):
            state, lg, g = net.forward_segment(k, state, prev if net.cascades else None)
            logits[k] = lg.float()
            if gates is not None:
                gates[k] = g.float()
            prev = lg
            s = self.policy(logits, gates, **self.options)
            if k == E - 1:
                break
            sc, t, strict = canonical(s.score[k], th[k], s.rule)
            fire = sc > t if strict else sc >= t
            if fire.any():
                done = alive[fire]
                pred[done], exit_[done], depth[done] = s.prediction[k][fire], k, k
                keep = ~fire
                alive, state, prev = alive[keep], _index(state, keep), prev[keep]
                logits = logits[:, keep]
                gates = gates[:, keep] if gates is not None else None
                if alive.numel() == 0:
                    break
        if alive.numel():
            if self.fallback == "final":
                best = torch.full_like(alive, E - 1)
            else:  # SDN: the most confident exit among all (the earliest on ties)
                sc, _, _ = canonical(s.score, th.new_zeros(E - 1), s.rule)
                best = sc.argmax(0)
            pred[alive] = s.prediction.gather(0, best[None]).squeeze(0)
            exit_[alive], depth[alive] = best, E - 1
        return EngineResult(pred, exit_, depth, self.dynamic_macs.to(dev)[depth])
