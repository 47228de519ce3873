"""The baseline objectives: the backbone alone (``final``), a weighted sum of every exit's
cross-entropy (``joint``: BranchyNet, SDN, PABEE or user weights), and exits trained on a frozen
backbone (``heads_only``: SDN's IC-only, the first stage of two-stage training)."""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import exit_losses
from ..network import ExitOutputs, MultiExitNetwork
from .base import EpochContext, Objective, register_objective

WEIGHT_SCHEMES = ("uniform", "sdn", "pabee")


@register_objective("final")
class Final(Objective):
    """The plain backbone (the "Baseline" of Scardapane et al.'s Table 1): cross-entropy of the
    final exit only. The exit heads are frozen and not even computed."""

    exits = (-1,)

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def prepare(self, net: MultiExitNetwork) -> None:
        net.heads.requires_grad_(False)

    def forward(self, outputs: ExitOutputs, targets: Tensor, indices: Tensor | None = None) -> dict[str, Tensor]:
        loss = F.cross_entropy(outputs.logits[-1], targets, label_smoothing=self.label_smoothing)
        return {"loss": loss}


@register_objective("joint")
class Joint(Objective):
    """``L = sum_i w_i CE_i`` over every exit.

    ``weights``: ``"uniform"`` (BranchyNet's w_i = 1), ``"sdn"`` (SDN's growing schedule
    w_i(e) = min(C_i, 0.01 + e C_i / E) for the internal classifiers, 1 for the final one),
    ``"pabee"`` (w_i = i / sum_j j) or a list with one weight per exit.

    ``checkpoint``: an eenn checkpoint whose backbone weights are loaded before training (a
    resumed run then loads its own): BranchyNet's recipe [C] trains the main network first
    (``final``), then every exit jointly from it (``joint`` with ``checkpoint=`` that run's
    ``best.safetensors``); without it, backbone and exits train together from scratch.

    Assumption [I]: SDN's C_i are its classifiers' positions as fractions of the network's cost
    (0.15 ... 0.9); here they are the exits' own measured cost fractions, which is what they
    stand for when exits are not at those exact positions.
    """

    def __init__(self, weights: str | Sequence[float] = "uniform", label_smoothing: float = 0.0,
                 checkpoint: str | os.PathLike | None = None) -> None:
        super().__init__()
        if isinstance(weights, str) and weights not in WEIGHT_SCHEMES:
            raise ValueError(f"unknown weight scheme {weights!r}; choose {', '.join(WEIGHT_SCHEMES)} or give a list")
        self.scheme = weights
        self.label_smoothing = label_smoothing
        self.checkpoint = checkpoint
        self.register_buffer("weights", torch.ones(0), persistent=False)
        self._fractions: list[float] = []

    def prepare(self, net: MultiExitNetwork) -> None:
        if self.checkpoint is not None:
            load_backbone(net, self.checkpoint)
        e = net.num_exits
        if isinstance(self.scheme, str):
            if self.scheme == "uniform":
                w = [1.0] * e
            elif self.scheme == "pabee":
                w = [(i + 1) / (e * (e + 1) / 2) for i in range(e)]
            else:
                self._fractions = list(net.cost().fraction)
                w = self._sdn(0, 1)
        else:
            w = [float(v) for v in self.scheme]
            if len(w) != e:
                raise ValueError(f"joint: got {len(w)} weights for a network with {e} exits (final exit included)")
            if any(v < 0 for v in w) or not any(v > 0 for v in w):
                raise ValueError(f"joint: weights must be >= 0 and not all zero, got {w}")
        self.weights = torch.tensor(w, dtype=torch.float32, device=self.weights.device)

    def _sdn(self, epoch: int, num_epochs: int) -> list[float]:
        """SDN's weights in epoch ``epoch`` (counted from 1, as SDN's training loop does: the
        first epoch already has C_i / E, the last C_i)."""
        c = self._fractions
        return [min(ci, 0.01 + epoch * ci / num_epochs) for ci in c[:-1]] + [1.0]

    def begin_epoch(self, ctx: EpochContext) -> None:
        if self.scheme == "sdn":  # ctx.epoch counts from 0
            self.weights = torch.tensor(self._sdn(ctx.epoch + 1, ctx.num_epochs), device=self.weights.device)

    def forward(self, outputs: ExitOutputs, targets: Tensor, indices: Tensor | None = None) -> dict[str, Tensor]:
        per_exit = exit_losses(outputs.logits, targets, self.label_smoothing)
        w = self.weights.to(per_exit.device, per_exit.dtype)
        return {"loss": (w * per_exit).sum(), "exit_losses": per_exit.detach()}


@register_objective("heads_only")
class HeadsOnly(Objective):
    """Train the exits on a frozen, already trained backbone: ``L = sum_i CE_i`` over the
    intermediate exits (the final classifier is frozen too unless ``train_final``).

    ``checkpoint``: an eenn checkpoint whose backbone weights are loaded before training (e.g.
    the result of training with ``final``); without it the network's current backbone is used.
    The frozen backbone stays in eval mode, so its BatchNorm statistics do not move.
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None, train_final: bool = False,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.train_final = train_final
        self.label_smoothing = label_smoothing

    def prepare(self, net: MultiExitNetwork) -> None:
        if net.num_exits < 2 and not self.train_final:
            raise ValueError("heads_only: this network has no intermediate exits to train")
        if self.checkpoint is not None:
            load_backbone(net, self.checkpoint)
        net.backbone.requires_grad_(False)
        if self.train_final:
            net.backbone.classifier.requires_grad_(True)
        self.exits = None if self.train_final else tuple(range(net.num_exits - 1))

    def train_mode(self, net: MultiExitNetwork) -> None:
        net.train()
        net.backbone.eval()
        if self.train_final:
            net.backbone.classifier.train()

    def forward(self, outputs: ExitOutputs, targets: Tensor, indices: Tensor | None = None) -> dict[str, Tensor]:
        per_exit = exit_losses(outputs.logits, targets, self.label_smoothing)
        return {"loss": per_exit.sum(), "exit_losses": per_exit.detach()}


def load_backbone(net: MultiExitNetwork, path: str | os.PathLike) -> None:
    """Copy the backbone weights of checkpoint ``path`` into ``net``, refusing one whose backbone
    differs (other exits or heads in the checkpoint do not matter)."""
    from ..checkpoint import CheckpointError, read_checkpoint

    _, tensors = read_checkpoint(path)
    mine = net.backbone.state_dict()
    theirs = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    missing = sorted(set(mine) - set(theirs))
    extra = sorted(set(theirs) - set(mine))
    wrong = sorted(k for k in set(mine) & set(theirs) if mine[k].shape != theirs[k].shape)
    if missing or extra or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
            if keys
        )
        raise CheckpointError(f"the backbone in {path} does not match this network's backbone ({detail})")
    net.backbone.load_state_dict(theirs)
