"""NACHOS (Gambella et al., arXiv 2401.13330; METHODS.md §4): the early-exit-classifier loss

    L = w_α·L_cls + β·L_prior + w_β·L_MACs + w_γ·L_sup

over gated exits (confidences c_{n,i}, c_{n,B} = 1) and the stick-breaking exit probabilities
π_{n,i} = c_{n,i} ∏_{j<i} (1 − c_{n,j}). Each term is a small pure function below, so the tests
can check it against a hand computation; :class:`NACHOS` only wires them together and draws the
per-epoch support set. :func:`cumulative_exit` is NACHOS' inference rule, for the policy layer.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import TensorDataset
from ..network import ExitOutputs, MultiExitNetwork
from .base import EpochContext, Objective, register_objective
from ..functional import stick_breaking

__all__ = ["NACHOS", "classification_loss", "cumulative_exit", "draw_support_set", "exit_accuracy_by_class",
           "macs_penalty", "prior_loss", "support_loss"]

ABLATIONS = (None, "nopeak", "noconstraints")
CONF_CLIP = 1e-4
_SUPPORT_STREAM = 4  # the generator stream of the support-set draw (other objectives may use others)


class _Required:
    """Default of an option that must be given (a ValueError, not a bare TypeError, when missing)."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()


# ------------------------------------------------------------------------------------- the terms
def classification_loss(logits: Tensor, targets: Tensor, pi: Tensor) -> Tensor:
    """L_cls = Σ_i mean_n [π_{n,i} CE(h_{n,i}, y_n)] (Pomponi's ``joint_type='losses'``)."""
    e, b, _ = logits.shape
    ce = F.cross_entropy(logits.flatten(0, 1), targets.repeat(e), reduction="none").view(e, b)
    return (pi * ce).mean(1).sum()


def prior_loss(logits: Tensor, gates: Tensor, targets: Tensor) -> Tensor:
    """L_prior: class-balanced BCE between each early exit's clipped confidence and whether that
    exit is right, t_i = 1[argmax h_i = y]; weights N/(2·#pos) and N/(2·#neg) per exit; mean over
    samples and exits, the final exit excluded. Zero for a network without early exits."""
    if logits.shape[0] < 2:
        return logits.new_zeros(())
    c = gates[:-1].clamp(CONF_CLIP, 1 - CONF_CLIP)
    t = (logits[:-1].argmax(-1) == targets).to(c.dtype)
    n = t.shape[1]
    pos = t.sum(1, keepdim=True)
    # [I] An exit with no right (or no wrong) sample in the batch: that side's weight multiplies
    # nothing, so the count is floored at 1 only to keep the arithmetic finite.
    w_pos = n / (2 * pos.clamp(min=1))
    w_neg = n / (2 * (n - pos).clamp(min=1))
    bce = -(w_pos * t * c.log() + w_neg * (1 - t) * (1 - c).log())
    return bce.mean()


def macs_penalty(pi: Tensor, macs: Tensor, mmax: float | None) -> tuple[Tensor, Tensor]:
    """``(L_MACs, m)``: the expected MACs per sample m = mean_n Σ_i π_{n,i} MACs_i and the hinge
    max(0, m − Mmax) / |MACs_B − Mmax|, zero when the full network already fits (MACs_B ≤ Mmax)
    or when ``mmax`` is None.

    The reference computes m with ``.item()``, so its penalty is a constant that trains nothing
    (a bug, METHODS.md §4); here m stays in the graph [I] and the penalty pulls the gates
    towards cheaper exits whenever the ceiling is exceeded."""
    m = (pi * macs.to(pi)[:, None]).sum(0).mean()
    full = float(macs[-1])
    if mmax is None or full <= mmax:
        return m.new_zeros(()), m
    return torch.relu(m - mmax) / abs(full - mmax), m


def support_loss(gates: Tensor, targets: Tensor, accuracy: Tensor) -> Tensor:
    """L_sup = mean_n MSE(A[y_n, :], c_{n, :}): each sample's confidences pulled to its class's
    per-exit accuracy on the support set. The final column (c_B = 1) adds a constant only."""
    a = accuracy.to(gates)[targets]  # [B, E]
    return F.mse_loss(gates.t(), a)


def cumulative_exit(gates: Tensor, eps: float | Sequence[float] | Tensor) -> Tensor:
    """NACHOS' inference rule: s_i = Σ_{j≤i} π_j; leave at the first exit with s_i ≥ ε_i, the
    final exit when none does. ``gates [E, B]`` -> exit index ``[B]``; ``eps`` is a scalar or
    one threshold per exit (E values, or E−1 for the early exits)."""
    s = stick_breaking(gates).cumsum(0)
    th = torch.as_tensor(eps, dtype=s.dtype, device=s.device)
    if th.dim() == 1:
        if th.numel() == s.shape[0] - 1:
            th = torch.cat([th, th.new_zeros(1)])  # the final exit always takes what is left
        if th.numel() != s.shape[0]:
            raise ValueError(f"cumulative_exit: got {th.numel()} thresholds for {s.shape[0]} exits")
        th = th[:, None]
    fire = s >= th
    fire[-1] = True
    return fire.to(torch.int8).argmax(0)


# --------------------------------------------------------------------------------- the support set
def draw_support_set(labels: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
    """Sorted indices of a class-balanced draw of ``round(fraction·N)`` samples: every class
    present gives the same number, the remainder going one each to classes picked at random.
    [I] "Class-balanced" is read as equal counts per class; a class with too few samples gives
    all it has (the set is then smaller than asked)."""
    y = labels.detach().cpu()
    size = round(fraction * len(y))
    classes = torch.unique(y)
    base, extra = divmod(size, len(classes))
    quota = torch.full((len(classes),), base, dtype=torch.int64)
    quota[torch.randperm(len(classes), generator=generator)[:extra]] += 1
    picks = []
    for c, q in zip(classes.tolist(), quota.tolist()):
        idx = (y == c).nonzero().squeeze(1)
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:q]])
    return torch.cat(picks).sort().values


@torch.no_grad()
def exit_accuracy_by_class(net: MultiExitNetwork, data: TensorDataset, normalise, num_classes: int,
                           batch_size: int = 256) -> Tensor:
    """A ``[K, E]``: accuracy of every exit on the samples of each class (eval mode, no
    gradients); rows of classes absent from ``data`` are 0. The modules' training flags are
    restored one by one afterwards, so a frozen part that was in eval mode stays there."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        correct = torch.zeros(num_classes, net.num_exits, dtype=torch.float64)
        count = torch.zeros(num_classes, dtype=torch.float64)
        for start in range(0, len(data), batch_size):
            x, y = data.x[start:start + batch_size], data.y[start:start + batch_size]
            logits = net(normalise(x)).logits
            hit = (logits.argmax(-1) == y.to(logits.device)).t().double().cpu()  # [B, E]
            y = y.cpu()
            correct.index_add_(0, y, hit)
            count.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    finally:
        for m, mode in modes:
            m.training = mode
    return (correct / count.clamp(min=1)[:, None]).float()


# ------------------------------------------------------------------------------------ the objective
@register_objective("nachos")
class NACHOS(Objective):
    """The NACHOS early-exit-classifier loss (METHODS.md §4) on a network with gated heads
    (e.g. ``head="nachos"``).

    Args:
        mmax: required; the MAC ceiling per sample, in the units of ``net.cost().macs``
            (absolute MACs); None switches the constraint term off.
        w_alpha, w_beta, w_gamma: weights of L_cls, L_MACs and L_sup (all 1 in NACHOS).
        prior_beta: β, the weight of L_prior.
        support_set: draw a class-balanced support set each epoch, hold it out of the
            epoch's batches and calibrate the confidences to its per-class accuracies (L_sup).
        support_fraction: its size as a fraction of the training split.
        support_warmup: the first (0-based) epoch with a support set (NACHOS'
            ``warmup_ee_epochs``); before it L_sup is off and every sample trains.
        ablation: ``"nopeak"`` (w_γ = 0) or ``"noconstraints"`` (w_β = 0).
        freeze_backbone: train only the exits on a frozen backbone (as NACHOS does), the
            backbone kept in eval mode; the final classifier is part of it and frozen too.
        cost: ``"macs"`` (backbone to the exit + that exit's head: NACHOS' f2 accounting) or
            ``"dynamic_macs"`` (every earlier head counted too).

    Two defaults are ours [ours]: NACHOS trains the exits of an already trained backbone, frozen,
    for 5 warm-up epochs and 5 more (``freeze_backbone=True, support_warmup=5``, and
    ``support_set=True`` where its ``--support_set`` is given); eenn's defaults train backbone and
    exits together from scratch (the design search trains each candidate so), where a frozen
    backbone would learn nothing and a warm-up has nothing to wait for.

    Logged parts are unweighted: ``cls``, ``prior``, ``macs`` (m, absolute MACs),
    ``macs_penalty`` and ``sup``.
    """

    def __init__(self, mmax: float | None = REQUIRED, w_alpha: float = 1.0, w_beta: float = 1.0, w_gamma: float = 1.0,
                 prior_beta: float = 1.0, support_set: bool = False, support_fraction: float = 0.1,
                 support_warmup: int = 0, ablation: str | None = None, freeze_backbone: bool = False,
                 cost: str = "macs") -> None:
        super().__init__()
        if mmax is REQUIRED:
            raise ValueError("nachos needs mmax: the MAC ceiling per sample, in the units of net.cost().macs "
                             "(or mmax=None to train without the MACs constraint)")
        if ablation not in ABLATIONS:
            raise ValueError(f"nachos: unknown ablation {ablation!r}; choose 'nopeak', 'noconstraints' or None")
        if mmax is not None and mmax <= 0:
            raise ValueError(f"nachos: mmax must be > 0 MACs (or None to switch the constraint off), got {mmax}")
        if not 0 < support_fraction < 1:
            raise ValueError(f"nachos: support_fraction must be in (0, 1), got {support_fraction}")
        if cost not in ("macs", "dynamic_macs"):
            raise ValueError(f"nachos: cost must be 'macs' or 'dynamic_macs', got {cost!r}")
        self.mmax = None if mmax is None else float(mmax)
        self.w_alpha, self.prior_beta = float(w_alpha), float(prior_beta)
        self.w_beta = 0.0 if ablation == "noconstraints" else float(w_beta)
        self.w_gamma = 0.0 if ablation == "nopeak" else float(w_gamma)
        self.ablation = ablation
        self.support_set, self.support_fraction, self.support_warmup = support_set, support_fraction, support_warmup
        self.freeze_backbone, self.cost = freeze_backbone, cost
        self.register_buffer("macs", torch.zeros(0), persistent=False)
        self.register_buffer("accuracy", torch.zeros(0, 0), persistent=False)  # A [K, E]
        self.support_indices: Tensor | None = None  # this epoch's support set (None: no L_sup)

    def prepare(self, net: MultiExitNetwork) -> None:
        if not net.has_gates:
            raise ValueError(
                "nachos needs exit heads with a confidence gate; build the network with head='nachos' "
                "(or another gated head: 'branching', 'eenets', or gate=True)"
            )
        dev = self.macs.device
        macs = getattr(net.cost(), self.cost)
        self.macs = torch.tensor(macs, dtype=torch.float32, device=dev)
        if self.mmax is not None and self.mmax >= macs[-1]:
            warnings.warn(f"nachos: mmax={self.mmax:.4g} is at least the full network's {macs[-1]:.4g} MACs, so the "
                          "MACs constraint never binds", stacklevel=2)
        elif self.mmax is not None and self.mmax < min(macs):
            # NACHOS' scripts give the ceiling in millions (--mmax 2.7): an easy slip here.
            warnings.warn(f"nachos: mmax={self.mmax:.4g} is below the cheapest exit's {min(macs):.4g} MACs (mmax is in "
                          "MACs per sample, not millions); the penalty can never reach zero", stacklevel=2)
        self.accuracy = torch.zeros(net.num_classes, net.num_exits, device=dev)
        if self.freeze_backbone:
            net.backbone.requires_grad_(False)

    def train_mode(self, net: MultiExitNetwork) -> None:
        net.train()
        if self.freeze_backbone:
            net.backbone.eval()  # its BatchNorm statistics must not move either

    def begin_epoch(self, ctx: EpochContext) -> Tensor | None:
        """Draw this epoch's support set, measure A on it and return it to be held out."""
        self.support_indices = None
        if not self.support_set or ctx.epoch < self.support_warmup:
            return None
        # The same generator on every DDP rank, so every rank holds out the same samples.
        idx = draw_support_set(ctx.train.y, self.support_fraction, ctx.generator(_SUPPORT_STREAM))
        support = ctx.train.subset(idx.to(ctx.train.device))
        acc = exit_accuracy_by_class(ctx.net, support, ctx.normalise, ctx.net.num_classes)
        self.accuracy = acc.to(self.accuracy.device)
        self.support_indices = idx
        return idx

    def forward(self, outputs: ExitOutputs, targets: Tensor, indices: Tensor | None = None) -> dict[str, Tensor]:
        logits, gates = outputs.logits, outputs.gates
        if gates is None:
            raise ValueError("nachos needs the exits' confidences (gates); build the network with head='nachos'")
        logits, gates = logits.float(), gates.float()
        pi = stick_breaking(gates)
        e, b, _ = logits.shape
        ce = F.cross_entropy(logits.flatten(0, 1), targets.repeat(e), reduction="none").view(e, b)
        cls = (pi * ce).mean(1).sum()  # = classification_loss, sharing the per-exit CE with the log
        prior = prior_loss(logits, gates, targets)
        penalty, m = macs_penalty(pi, self.macs, self.mmax)
        sup = support_loss(gates, targets, self.accuracy) if self.support_indices is not None else cls.new_zeros(())
        loss = self.w_alpha * cls + self.prior_beta * prior + self.w_beta * penalty + self.w_gamma * sup
        return {"loss": loss, "cls": cls.detach(), "prior": prior.detach(), "macs": m.detach(),
                "macs_penalty": penalty.detach(), "sup": sup.detach(), "exit_losses": ce.mean(1).detach()}
