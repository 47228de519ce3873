"""AEP, "Anticipate, Ensemble and Prune" (Sarti, Lomurno, Matteucci, arXiv 2301.12168; METHODS.md §3).

Every exit is trained with a weighted cross-entropy, ``L = sum_i w_i CE(h_i, y)`` [C], and the
network predicts with the same weighted ensemble of exit probabilities, ``sum_i w_i p_i`` [C].
After training, :func:`eenn.prune.aep_prune` keeps the cheapest truncation of that ensemble
with the best validation accuracy.

Only the abstract and a summary of the paper were available, so these are assumptions [I]:

- The weights are normalised, ``sum_i w_i = 1``, and the scheme is a flag:
  ``uniform`` w_i = 1/N; ``linear`` w_i = i / sum_j j (1-based: deeper exits weigh more);
  ``learned`` w = softmax(theta), theta a parameter of the objective (initialised to 0, so
  training starts uniform); ``hybrid`` w ∝ (i / sum_j j) * N softmax(theta), the linear prior
  times a learned factor, renormalised. The factor N and softmax's own normaliser cancel in the
  renormalisation, so hybrid is ``softmax(theta + log i)``: it starts as ``linear``.
- How theta learns. Minimising ``sum_i softmax(theta)_i CE_i`` over theta moves all the weight
  to whichever exit has the lowest training loss (d/dtheta_j = w_j (CE_j - L)), which ends the
  training of every other exit and turns the ensemble into one classifier. So by default the
  network is trained on ``sum_i w_i CE_i`` with w held constant, and theta learns how to MIX
  the exits, from the cross-entropy of ensembles of (constant) exit outputs:
  ``learn_weights_from="prefix"`` (default): the mean over k of the CE of the ensemble truncated
  at exit k, since each truncation is a candidate of the pruning step; ``"ensemble"``: the CE of
  the full ensemble only; ``"joint"``: the literal weighted sum (theta gets its gradient; kept
  for comparison: it collapses). Even so, on training data the deepest exits fit best, so the
  learned weights grow with depth and the shallow exits, trained with small weights, learn less
  than under a fixed scheme (width-0.5 ResNet-20, exits after stages 1, 3, 5, digits, 25
  epochs: ``learned`` ends near w = [.001 .012 .21 .78] with exits at 22/76/97/97% validation
  accuracy, against 94/97/98/99% with uniform weights). ``exit_loss_weights="prior"`` trains
  the exits with the scheme's fixed part instead (uniform for ``learned``, linear for
  ``hybrid``) and uses theta only for the prediction; the loss is then ``sum_i prior_i CE_i``,
  no longer the prediction's weights.
- theta is optimised by the trainer's optimiser, learning rate and weight decay (a decay that
  pulls it gently towards the prior).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import (SCHEMES, ensemble_so_far, ensemble_so_far_log, exit_losses, scheme_log_weights,
                          scheme_weights)
from ..network import ExitOutputs, MultiExitNetwork
from .base import Objective, register_objective

__all__ = ["AEP", "SCHEMES", "ensemble_so_far", "ensemble_so_far_log", "scheme_log_weights", "scheme_weights"]

WEIGHT_SOURCES = ("prefix", "ensemble", "joint")
EXIT_LOSS_WEIGHTS = ("learned", "prior")
_PRIOR = {"learned": "uniform", "hybrid": "linear"}  # the fixed part of each learned scheme


@register_objective("aep")
class AEP(Objective):
    """``L = sum_i w_i CE(h_i, y)`` with weights from ``scheme`` (``"uniform"``, ``"linear"``,
    ``"learned"`` or ``"hybrid"``, the default). Logs ``exit_losses``, ``ensemble_ce`` (the CE
    of the prediction ``sum_i w_i p_i``) and, for the learned schemes, ``prefix_ce`` (the mean CE
    of the ensembles truncated at each exit).

    Learned schemes only (assumptions [I], module docstring): ``learn_weights_from`` is what
    trains theta, ``"prefix"`` (default), ``"ensemble"`` or ``"joint"``; ``exit_loss_weights``
    is ``"learned"`` (default: the exits are trained with the prediction's weights, held
    constant) or ``"prior"``. The reported loss is the weighted sum in every case.

    ``num_exits`` builds theta at once (otherwise :meth:`prepare` does, from the network). The
    current weights: :meth:`weights`.
    """

    def __init__(self, scheme: str = "hybrid", learn_weights_from: str = "prefix",
                 exit_loss_weights: str = "learned", num_exits: int | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        for value, allowed, what in ((scheme, SCHEMES, "scheme"), (learn_weights_from, WEIGHT_SOURCES, "learn_weights_from"),
                                     (exit_loss_weights, EXIT_LOSS_WEIGHTS, "exit_loss_weights")):
            if value not in allowed:
                raise ValueError(f"aep: unknown {what} {value!r}; choose {', '.join(allowed)}")
        if learn_weights_from == "joint" and exit_loss_weights == "prior":
            raise ValueError("aep: learn_weights_from='joint' learns theta from the exits' loss, so the exits "
                             "must be weighted by it (exit_loss_weights='learned')")
        self.scheme = scheme
        self.learn_weights_from = learn_weights_from
        self.exit_loss_weights = exit_loss_weights
        self.label_smoothing = label_smoothing
        self.num_exits: int | None = None
        self.theta: nn.Parameter | None = None
        if num_exits is not None:
            self._build(num_exits)

    @property
    def learned(self) -> bool:
        return self.scheme in _PRIOR

    def _build(self, num_exits: int, device: torch.device | None = None) -> None:
        if self.num_exits is not None and num_exits != self.num_exits:
            raise ValueError(f"aep: this objective was built for {self.num_exits} exits, "
                             f"the network has {num_exits}")
        self.num_exits = int(num_exits)
        if self.learned and self.theta is None:
            self.theta = nn.Parameter(torch.zeros(self.num_exits, device=device))

    def prepare(self, net: MultiExitNetwork) -> None:
        # theta is made here, before the trainer builds its optimiser, so that it is trained.
        self._build(net.num_exits, next(net.parameters()).device)

    def log_weights(self) -> Tensor:
        """``log w [E]``, differentiable in theta."""
        if self.num_exits is None:
            raise RuntimeError("aep: the number of exits is not known yet; call prepare(net) or pass num_exits")
        return scheme_log_weights(self.scheme, self.num_exits, self.theta)

    @torch.no_grad()
    def weights(self) -> Tensor:
        """The current normalised weights ``w [E]`` (no gradient), final exit last."""
        return self.log_weights().exp()

    def forward(self, outputs: ExitOutputs, targets: Tensor, indices: Tensor | None = None) -> dict[str, Tensor]:
        logits = outputs.logits
        if self.num_exits is None:
            self._build(logits.shape[0], logits.device)
        if logits.shape[0] != self.num_exits:
            raise ValueError(f"aep: got outputs of {logits.shape[0]} exits, the weights are for {self.num_exits}")
        ls = self.label_smoothing
        per_exit = exit_losses(logits, targets, ls)
        log_w = self.log_weights().to(logits.device)
        w = log_w.exp()
        if not self.learned or self.learn_weights_from == "joint":
            with torch.no_grad():
                ens_ce = F.cross_entropy(ensemble_so_far_log(logits, log_w)[-1], targets, label_smoothing=ls)
            return {"loss": (w * per_exit).sum(), "exit_losses": per_exit.detach(), "ensemble_ce": ens_ce}
        # theta sees only ensembles of constant exit outputs; the exits see constant weights.
        prefix = exit_losses(ensemble_so_far_log(logits.detach(), log_w), targets, ls)  # [E]
        theta_loss = prefix.mean() if self.learn_weights_from == "prefix" else prefix[-1]
        train_w = w.detach() if self.exit_loss_weights == "learned" else \
            scheme_weights(_PRIOR[self.scheme], self.num_exits).to(w.device)
        # (x - x.detach()) adds theta's gradient without changing the value, so the reported
        # loss stays the weighted sum of the exits' CE, comparable across schemes.
        loss = (train_w * per_exit).sum() + (theta_loss - theta_loss.detach())
        return {"loss": loss, "exit_losses": per_exit.detach(), "ensemble_ce": prefix[-1].detach(),
                "prefix_ce": prefix.mean().detach()}
