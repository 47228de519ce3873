"""The exit head module every head builder returns: a ``body`` to a flat vector, a linear
classifier to the class logits, optionally a gate (a linear unit and a sigmoid) and ZTW's cascade
input; and the head used as a truncated network's final classifier. The builders, one per head
type, are in :mod:`eenn.heads`."""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ExitHead", "HeadClassifier"]


class ExitHead(nn.Module):
    """``body`` -> flat vector of size ``feature_dim`` -> logits (and a gate in [0, 1]).

    With :meth:`add_cascade` (``create_head(..., cascade=True)``) the head also reads the
    previous exit's logits, layer-normalised and detached, beside its own vector (Zero Time
    Waste's cascading heads)."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int, *, gate: bool = False,
                 gate_probs: bool = False) -> None:
        super().__init__()
        self.body = body
        self.feature_dim = feature_dim
        self.classifier = nn.Linear(feature_dim, num_classes)
        # gate_probs: the gate also reads its own exit's class probabilities, sorted (so it sees
        # how peaked they are, whatever the class) and detached (the gate's losses do not move the
        # classifier) [ours]: a gate can then learn at least what max_prob or the margin know.
        self.gate_probs = bool(gate and gate_probs)
        self.gate = nn.Linear(feature_dim + (num_classes if self.gate_probs else 0), 1) if gate else None
        self.cascade_norm: nn.LayerNorm | None = None

    @property
    def has_gate(self) -> bool:
        return self.gate is not None

    @property
    def cascades(self) -> bool:
        return self.cascade_norm is not None

    def add_cascade(self, prev_classes: int) -> "ExitHead":
        """Widen the classifier (and gate) to also read the previous exit's ``prev_classes`` logits."""
        d, k = self.feature_dim, self.classifier.out_features
        self.cascade_norm = nn.LayerNorm(prev_classes)
        self.classifier = nn.Linear(d + prev_classes, k)
        if self.gate is not None:
            self.gate = nn.Linear(d + prev_classes + (k if self.gate_probs else 0), 1)
        return self

    @property
    def reads_keep(self) -> bool:
        """Whether the body can leave padded tokens out (a ``keep`` mask, :func:`eenn.attach_exits`'s ``pad_id``)."""
        return _reads_keep(self.body)

    def forward(self, x: Tensor, prev_logits: Tensor | None = None, keep: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """``keep`` (``[B, N]`` bool, token states only): the tokens that are not padding."""
        z = self.body(x) if keep is None else _with_keep(self.body, x, keep)
        if self.cascade_norm is not None:
            if prev_logits is None:
                raise ValueError("this cascading head needs the previous exit's logits")
            # Detached, as in ZTW: a later head must not pull an earlier head's output around.
            z = torch.cat([z, self.cascade_norm(prev_logits.detach())], dim=1)
        logits = self.classifier(z)
        if self.gate is None:
            return logits, None
        g_in = z
        if self.gate_probs:
            probs = logits.detach().float().softmax(-1).sort(-1, descending=True).values.to(z.dtype)
            g_in = torch.cat([z, probs], dim=1)
        return logits, torch.sigmoid(self.gate(g_in)).squeeze(1)


def _reads_keep(body: nn.Module) -> bool:
    if getattr(body, "takes_keep", False):
        return True
    return isinstance(body, nn.Sequential) and len(body) > 0 and _reads_keep(body[0])


def _with_keep(body: nn.Module, x: Tensor, keep: Tensor) -> Tensor:
    """``body(x)`` with the padding mask given to the module that reads the tokens (the body
    itself, or the first of a ``nn.Sequential``: a pool, then hidden layers)."""
    if getattr(body, "takes_keep", False):
        return body(x, keep)
    if not _reads_keep(body):
        raise ValueError(f"this exit head's body ({type(body).__name__}) cannot leave padded tokens out")
    z = _with_keep(body[0], x, keep)
    for sub in list(body)[1:]:
        z = sub(z)
    return z


class HeadClassifier(nn.Module):
    """An exit head used as a network's final classifier (after truncation): logits only."""

    def __init__(self, head: ExitHead) -> None:
        super().__init__()
        self.head = head
        self.takes_keep = head.reads_keep

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        return self.head(x, keep=keep)[0]
