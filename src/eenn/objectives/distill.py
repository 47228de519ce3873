"""Self-distillation from the final exit to the early ones (METHODS.md §5).

Two forms, both with the final exit as a detached teacher:

- ``"byot"`` (Be Your Own Teacher; defaults T = 3, α = 0.1 from the unofficial
  luanyunteng/pytorch-be-your-own-teacher ``train.py`` [C]):
  ``L = Σ_{i<B} [(1−α) CE(h_i, y) + α T² KL(softmax(h_B/T) ‖ softmax(h_i/T))] + (1−α) CE(h_B, y)``
  (the sum over every exit, the final one's KL being 0, as in that ``train.py``).
- ``"ztw"`` (Zero Time Waste's ``distill_last`` [C]): the mean cross-entropy of every exit plus
  ``mean_{i<B} CE(h_i, softmax(h_B).detach())``, the auxiliary weight being 1 [I].
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..network import ExitOutputs, MultiExitNetwork
from .base import Objective, register_objective
from ..functional import exit_losses

__all__ = ["SelfDistill", "kd_term"]

VARIANTS = ("byot", "ztw")


def kd_term(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T² KL(softmax(teacher/T) ‖ softmax(student/T))`` per early exit, batch-averaged:
    ``[E', B, C]`` students and one ``[B, C]`` teacher (detached here) -> ``[E']``. The T²
    keeps the gradient's scale independent of T (Hinton et al.)."""
    t = temperature
    log_q = F.log_softmax(teacher.detach() / t, dim=-1)
    log_p = F.log_softmax(student / t, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # [E', B]
    return t * t * kl.mean(-1)


@register_objective("distill")
class SelfDistill(Objective):
    """Train every exit on the labels while the early exits also learn from the final one.

    Args:
        temperature: T of the BYOT term.
        alpha: α, the share of the BYOT distillation term in each early exit's loss.
        variant: ``"byot"`` or ``"ztw"`` (see the module docstring).

    Not included: BYOT's feature hint β Σ_i ‖F_i − F_B‖². It needs every exit's intermediate
    feature map (after an adaptation layer that matches the final one's shape), and the
    network's outputs (``ExitOutputs``) are logits and gates only; faking it from logits would
    be another loss. The reference's β = 1e-6 makes it negligible there anyway.
    """

    def __init__(self, temperature: float = 3.0, alpha: float = 0.1, variant: str = "byot",
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"distill: unknown variant {variant!r}; choose {', '.join(VARIANTS)}")
        if temperature <= 0 or not 0 <= alpha <= 1:
            raise ValueError(f"distill: need temperature > 0 and 0 <= alpha <= 1, got {temperature}, {alpha}")
        self.temperature, self.alpha, self.variant = float(temperature), float(alpha), variant
        self.label_smoothing = label_smoothing

    def prepare(self, net: MultiExitNetwork) -> None:
        if net.num_exits < 2:
            raise ValueError("distill: this network has no early exit to distil into")

    def forward(self, outputs: ExitOutputs, targets: Tensor, indices: Tensor | None = None) -> dict[str, Tensor]:
        logits = outputs.logits.float()
        ce = exit_losses(logits, targets, self.label_smoothing)  # [E]
        teacher = logits[-1].detach()
        if self.variant == "byot":
            kd = kd_term(logits[:-1], teacher, self.temperature)
            early = ((1 - self.alpha) * ce[:-1] + self.alpha * kd).sum()
            loss = early + (1 - self.alpha) * ce[-1]
        else:
            # CE against soft targets = KL + the teacher's entropy: the same gradient as KL at T = 1.
            e = logits.shape[0] - 1
            soft = F.softmax(teacher, dim=-1).repeat(e, 1)
            kd = F.cross_entropy(logits[:-1].flatten(0, 1), soft, reduction="none").view(e, -1).mean(1)
            loss = ce.mean() + kd.mean()
        return {"loss": loss, "kd": kd.mean().detach(), "exit_losses": ce.detach()}
