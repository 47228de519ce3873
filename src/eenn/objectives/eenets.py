"""EENets (Demir & Akbas, arXiv 2409.05336; METHODS.md §2): exits with learned confidences
trained against a cost term.

Notation: exits i = 0..N (N early exits, exit N is the final classifier), P_i = softmax of exit
i's logits, c_i its confidence (our networks' gate, in [0, 1]) and C_i its cost (MACs up to
and including exit i over the full network's, so C_N = 1). The loss versions:

- ``v0``: sum_i NLL(log P_i) (the first stage of two-stage training; confidences unused).
- ``v1``: P^_i = c_i P_i + (1 - c_i) P^_{i+1}, C^_i likewise, from P^_N = P_N, C^_N = 1;
  L = NLL(log P^_0) + lam mean(C^_0).
- ``v2`` (default): the v1 loss at every level, sum_{i=0..N} [NLL(log P^_i) + lam mean(C^_i)].
- ``v3``: w_i = mean(c_i) / sum_j mean(c_j); L = sum_i w_i [NLL(log P_i) + lam C_i].
- ``v4``: per-sample hard exit tags t; L = NLL(log P_t) + lam mean(C_t)
  + sum_i BCE(c_i, 1[t = i]) with class-balancing weights; the tags start uniform at random and
  become argmin_i [NLL_i + lam C_i] after every epoch.

At inference a sample leaves at the first exit with c_i > 0.5 (> 1/N for v3), else at the final
exit (:func:`confidence_exit`).

Assumption about the final confidence: EENets' final exit has its own learned confidence c_N;
in our networks the final exit's gate is the constant 1. Where c_N enters a formula this is
what follows: the recursions (v1, v2) never read c_N; v3's normalisation sums mean(c_N) = 1 into
the denominator (so the final exit's weight is 1 / sum_j mean(c_j), always the largest share
the early exits leave); v4's BCE term of the final exit is skipped, since a constant 1 cannot
learn and its negatives would be -log(0).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..network import ExitOutputs, MultiExitNetwork
from .base import EpochContext, Objective, register_objective
from .branching import (COST_KINDS, _check_gate_init, _check_lam, _check_outputs, _check_smoothing, _check_weight,
                        balanced_bce, correctness_bce, exit_costs, init_gates, probs_nll, require_gates)
from ..functional import exit_losses, first_above, soft_conditional_recursive

__all__ = ["EENets", "VERSIONS", "confidence_exit", "confidence_threshold", "exit_tag_bce", "best_exit_tags"]

VERSIONS = ("v0", "v1", "v2", "v3", "v4")


# ----------------------------------------------------------------------- policy function
def confidence_exit(gates: Tensor, version: str = "v2", num_exits: int | None = None) -> Tensor:
    """EENets' inference rule: per sample, the first exit whose confidence exceeds 0.5, or
    1/N for a model trained with v3 (N early exits, as EENets' ``num_ee``); the final exit when
    none does. ``gates [E, B]`` -> ``[B]``.

    ``num_exits`` counts every exit, the final one included (like ``net.num_exits``); by default
    ``gates.shape[0]``."""
    if version not in VERSIONS:
        raise ValueError(f"unknown EENets loss version {version!r}; choose one of {', '.join(VERSIONS)}")
    e = gates.shape[0] if num_exits is None else int(num_exits)
    return first_above(gates, confidence_threshold(version, e))


def confidence_threshold(version: str, num_exits: int) -> float:
    """The fixed confidence threshold of EENets' inference rule: 1/N after v3 (N early exits,
    ``num_exits - 1``), else 0.5."""
    n = int(num_exits) - 1
    return 1.0 / n if version == "v3" and n > 0 else 0.5


# ----------------------------------------------------------------------- v4 building blocks
def best_exit_tags(logits: Tensor, targets: Tensor, costs: Tensor, lam: float) -> Tensor:
    """Per sample, ``argmin_i [NLL_i + lam C_i]`` (the first exit on ties): the exit where the
    sample is best answered once its cost is counted. ``[E, B, K]`` -> ``[B]``."""
    e, b, _ = logits.shape
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.repeat(e), reduction="none").view(e, b)
    score = nll + lam * costs.to(nll.device, nll.dtype)[:, None]
    return score.argmin(0)


def exit_tag_bce(gates: Tensor, tags: Tensor) -> Tensor:
    """``sum_i BCE(c_i, 1[t = i])`` over the early exits, class-balanced per exit on the batch:
    a positive (the sample's tag is i) is weighted by the non-exit rate ``1 - r_i``, a negative by
    the exit rate ``r_i``, where ``r_i`` is the share of the batch tagged i. So a rare exit's few
    positives count as much, in total, as its many negatives. The final exit (constant gate 1)
    has no term. ``gates [E, B]``, ``tags [B]`` -> scalar."""
    early = gates[:-1]
    target = tags[None, :] == torch.arange(early.shape[0], device=tags.device)[:, None]
    return balanced_bce(early, target)


# ------------------------------------------------------------------------------ objective
@register_objective("eenets")
class EENets(Objective):
    """EENets' training losses (see the module docstring for the formulas).

    Args:
        version: ``"v0"`` .. ``"v4"``; ``"v2"`` is EENets' default.
        lam: the cost weight lambda (EENets' default 1.0).
        two_stage: if set, epochs ``< two_stage`` (0-based) train with v0 and the rest with
            ``version``. EENets' ``--two-stage`` is 25 epochs of v0 (its epochs ``<= 25``,
            1-based) followed by v1: ``EENets(version="v1", two_stage=25)``.
        cost: ``"macs"`` or ``"dynamic"`` gamma (see :func:`~eenn.objectives.branching.exit_costs`).
        seed: seed of v4's initial random tags (the same on every DDP rank).
        label_smoothing: applied to every NLL term of the loss (not to v4's tag choice, which
            compares plain NLLs).
        exit_ce, gate_bce, gate_init: what keeps every exit trained at a real budget, as for
            differentiable branching (:class:`~eenn.objectives.branching.Branching`) [ours]: the
            sum of the exits' own cross-entropies times ``exit_ce`` (not added to v0, which is
            that sum), the gates' correctness supervision (not added to v0, which ignores the
            confidences, nor to v4, which supervises them with its exit tags) and the uniform
            start of the mixture.
        levels: how v2 joins its N + 1 levels: ``"sum"`` (EENets' formula) or ``"mean"`` (the
            default with the exits' cross-entropies on, so that the soft-conditional levels weigh
            as one term beside them, as differentiable branching's one soft-conditional term does
            [ours]). ``exit_ce=0, gate_bce=0, gate_init="none", levels="sum"`` is EENets' literal
            loss; at a real budget it loses some exits to chance (see docs/RESULTS.md).

    v4 keeps one tag per training sample. Tags recorded from a training epoch's (detached)
    outputs are applied at the next :meth:`begin_epoch`, merged over DDP ranks first. The table is
    sized to the training split at the first epoch (and grows if ``forward`` sees larger
    indices) and is saved in the objective's ``state_dict`` (as extra state, see
    :meth:`get_extra_state`), so a resumed run continues with the same tags.
    """

    def __init__(self, version: str = "v2", lam: float = 1.0, two_stage: int | None = None, cost: str = "macs",
                 seed: int = 0, label_smoothing: float = 0.0, exit_ce: float = 1.0, gate_bce: float = 1.0,
                 gate_init: str | None = "uniform", levels: str | None = None) -> None:
        super().__init__()
        if version not in VERSIONS:
            raise ValueError(f"unknown EENets loss version {version!r}; choose one of {', '.join(VERSIONS)}")
        if cost not in COST_KINDS:
            raise ValueError(f"unknown cost {cost!r}; choose one of {', '.join(COST_KINDS)}")
        if two_stage is not None:
            if int(two_stage) < 0:
                raise ValueError(f"two_stage must be a number of epochs >= 0, got {two_stage}")
            if version == "v0":
                raise ValueError("two_stage switches from v0 to another version; it makes no sense with version='v0'")
        self.version = version
        self.lam = _check_lam(lam)
        self.two_stage = None if two_stage is None else int(two_stage)
        self.cost_kind = cost
        self.seed = int(seed)
        self.label_smoothing = _check_smoothing(label_smoothing)
        self.needs_indices = version == "v4"
        self.exit_ce = _check_weight("exit_ce", exit_ce)
        self.gate_bce = _check_weight("gate_bce", gate_bce)
        self.gate_init = _check_gate_init(gate_init)
        if levels is None:
            levels = "mean" if self.exit_ce else "sum"
        if levels not in ("sum", "mean"):
            raise ValueError(f"levels must be 'sum' (EENets' v2) or 'mean', got {levels!r}")
        self.levels = levels
        # The version in force this epoch; before the first begin_epoch, that of epoch 0.
        self.active = "v0" if self.two_stage else version
        self.register_buffer("gamma", torch.ones(0), persistent=False)
        self._num_exits: int | None = None
        # v4's tag table and the tags recorded this epoch (-1: sample not seen). Plain tensors,
        # not buffers: DDP broadcasts every buffer from rank 0 before each forward, which would
        # overwrite what the other ranks recorded. They are saved through get_extra_state.
        self.tags = torch.zeros(0, dtype=torch.long)
        self.pending = torch.zeros(0, dtype=torch.long)

    def extra_repr(self) -> str:
        two = f", two_stage={self.two_stage}" if self.two_stage is not None else ""
        return (f"version={self.version!r}, lam={self.lam}{two}, cost={self.cost_kind!r}, exit_ce={self.exit_ce}, "
                f"gate_bce={self.gate_bce}, gate_init={self.gate_init!r}, levels={self.levels!r}")

    # ------------------------------------------------------------------------- set-up
    def prepare(self, net: MultiExitNetwork) -> None:
        require_gates(net, "EENets", "eenets")
        self.gamma = exit_costs(net, self.cost_kind).to(self.gamma.device)
        self._num_exits = net.num_exits
        if self.gate_init == "uniform":
            init_gates(net)

    def begin_epoch(self, ctx: EpochContext) -> None:
        self.active = "v0" if self.two_stage is not None and ctx.epoch < self.two_stage else self.version
        if self.version != "v4":
            return None
        self._grow(len(ctx.train), ctx.device)
        if self.tags.numel() > len(ctx.train):
            raise ValueError(f"EENets v4 holds {self.tags.numel()} exit tags but the training split has "
                             f"{len(ctx.train)} samples; was this state saved on another data set?")
        pending = self.pending
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Each rank recorded the samples it saw; a sample is seen by one rank per epoch, so
            # the max of (tag + 1, or 0 if unseen) over ranks is its recorded tag + 1.
            merged = pending + 1
            dist.all_reduce(merged, op=dist.ReduceOp.MAX)
            pending = merged - 1
        seen = pending >= 0
        self.tags[seen] = pending[seen]
        self.pending.fill_(-1)
        return None

    def _grow(self, n: int, device: torch.device | str) -> None:
        """Make the tag table at least ``n`` long: existing tags are kept, new ones drawn
        U{0..N} from a generator seeded with ``seed`` (the same on every rank and every run)."""
        e = self._num_exits
        if e is None:
            raise RuntimeError("EENets v4: call prepare(net) before training (it reads the number of exits)")
        old = self.tags.numel()
        if n > old:
            draw = torch.randint(0, e, (n,), generator=torch.Generator().manual_seed(self.seed))
            draw[:old] = self.tags.cpu()
            pending = torch.full((n,), -1, dtype=torch.long)
            pending[:old] = self.pending.cpu()
            self.tags, self.pending = draw, pending
        self.tags, self.pending = self.tags.to(device), self.pending.to(device)

    # ---------------------------------------------------------------------- the state
    def get_extra_state(self) -> dict[str, Tensor]:
        """v4's tags and this epoch's not yet applied records (empty for other versions)."""
        return {"tags": self.tags.detach().cpu().clone(), "pending": self.pending.detach().cpu().clone()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        tags = torch.as_tensor(state["tags"], dtype=torch.long)
        pending = torch.as_tensor(state["pending"], dtype=torch.long)
        if pending.shape != tags.shape:
            raise ValueError(f"EENets state: {tags.numel()} tags but {pending.numel()} pending records")
        device = self.tags.device
        self.tags, self.pending = tags.clone().to(device), pending.clone().to(device)

    # --------------------------------------------------------------------------- loss
    def forward(self, outputs: ExitOutputs, targets: Tensor, indices: Tensor | None = None) -> dict[str, Tensor]:
        gamma = _check_outputs(outputs, self.gamma, "EENets")
        if self._num_exits is None:
            self._num_exits = gamma.numel()
        logits, conf = outputs.logits, outputs.gates
        lam, eps = self.lam, self.label_smoothing
        version = self.active
        if self.version == "v4" and indices is not None:
            self._grow(int(indices.max()) + 1, logits.device)  # a no-op once begin_epoch sized it
        out: dict[str, Tensor] = {}
        if version == "v0":
            per_exit = exit_losses(logits, targets, eps)
            loss = per_exit.sum()
            out.update(nll=loss.detach(), exit_losses=per_exit.detach())
        elif version in ("v1", "v2"):
            probs = soft_conditional_recursive(logits.softmax(-1), conf)
            costs = soft_conditional_recursive(gamma[:, None].expand_as(conf), conf)
            levels = range(1) if version == "v1" else range(len(probs))
            nll = sum(probs_nll(probs[i], targets, eps) for i in levels)
            cost = sum(costs[i].mean() for i in levels)
            if self.levels == "mean":
                nll, cost = nll / len(levels), cost / len(levels)
            loss = nll + lam * cost
            out.update(nll=nll.detach(), cost=cost.detach())
        elif version == "v3":
            per_exit = exit_losses(logits, targets, eps)
            mean_conf = conf.mean(1)  # the final exit's is 1 (see the module docstring)
            w = mean_conf / mean_conf.sum()
            loss = (w * (per_exit + lam * gamma)).sum()
            out.update(nll=(w * per_exit).sum().detach(), cost=(w * gamma).sum().detach(),
                       exit_losses=per_exit.detach())
        else:
            loss, parts = self._v4(logits, conf, targets, indices, gamma, lam, eps)
            out.update(parts)
        if self.version == "v4" and self.training and indices is not None:
            # Record from this batch's outputs; applied at the next begin_epoch ("after every
            # epoch"). Also during a v0 first stage, so v4 starts from tags the net earned.
            with torch.no_grad():
                self.pending[indices.to(self.pending.device)] = best_exit_tags(
                    logits.detach(), targets, gamma, lam).to(self.pending.device)
        if self.exit_ce and version != "v0":
            # The sum over exits, as for B-NET and differentiable branching, beside v2's levels
            # averaged (``levels="mean"``) [ours]. Two earlier forms fell short at the real
            # budget: the sum beside v2's summed levels (about 2(N + 1) cross-entropies in all)
            # killed AlexNet's classifier in the first epoch at SGD lr 0.05; twice the mean over
            # exits kept every exit 1-5 points below B-NET's on ResNet-18, and so more samples
            # deep at the same goal (0.73x B-NET's saving; docs/RESULTS.md).
            per_exit = exit_losses(logits, targets, eps)
            loss = loss + self.exit_ce * per_exit.sum()
            out.update(exit_ce=per_exit.sum().detach(), exit_losses=per_exit.detach())
        if self.gate_bce and version not in ("v0", "v4"):
            bce = correctness_bce(logits, conf, targets)
            loss = loss + self.gate_bce * bce
            out["gate_bce"] = bce.detach()
        if "exit_losses" not in out:
            with torch.no_grad():
                out["exit_losses"] = exit_losses(logits, targets, eps)
        return {"loss": loss, **out}

    def _v4(self, logits: Tensor, conf: Tensor, targets: Tensor, indices: Tensor | None, gamma: Tensor,
            lam: float, eps: float) -> tuple[Tensor, dict[str, Tensor]]:
        if indices is None:
            raise ValueError("EENets v4 needs the training samples' indices (forward(..., indices=...)); "
                             "the trainer passes them because needs_indices is True")
        t = self.tags[indices.to(self.tags.device)].to(logits.device)
        chosen = logits.gather(0, t.view(1, -1, 1).expand(1, -1, logits.shape[-1])).squeeze(0)  # [B, K] of exit t
        nll = F.cross_entropy(chosen, targets, label_smoothing=eps)
        cost = gamma[t].mean()  # no gradient: the tags are fixed this epoch; logged as in EENets
        bce = exit_tag_bce(conf, t)
        # 0 x every logit keeps every exit in the graph when no sample of the batch is tagged for
        # it (late in training with a large lam, none may be tagged for the final exit): DDP
        # without find_unused_parameters needs a gradient, zero or not, for every parameter.
        loss = nll + lam * cost + bce + 0.0 * logits.sum()
        return loss, {"nll": nll.detach(), "cost": cost.detach(), "bce": bce.detach()}
