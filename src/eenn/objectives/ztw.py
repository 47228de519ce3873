"""Zero Time Waste (Wójcik et al.; gmum/Zero-Time-Waste; METHODS.md §5), trained in two steps
after the backbone:

1. ``ztw_heads``: cascading heads (build the network with ``head_options={"cascade": True}``:
   every head but the first also reads the previous exit's logits, LayerNorm'ed and detached)
   trained on the frozen backbone with ``mean_i CE_i`` [C].
2. ``ztw_ensemble``: with the whole network frozen (``checkpoint=``: the ``ztw_heads`` run's
   weights, backbone and heads), a :class:`GeometricEnsemble` per exit,
   ``z_i = (1/i) Σ_{j≤i} exp(w_ij) log_softmax(h_j) + b_i`` [C], trained with CE(z_i, y).
   A run (``eenn train``) stores the trained ensemble in its ``best.safetensors`` as the exit
   policy ``ExitPolicy("ensemble", ensemble=...)`` and reports with it (:mod:`eenn.run`).

:func:`save_ensemble` / :func:`load_ensemble` keep a trained ensemble in a safetensors file
for the exit policies (exit when max softmax(z_i) exceeds a threshold).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..functional import exit_losses, geometric_ensemble
from ..network import ExitOutputs, MultiExitNetwork
from .base import Objective, register_objective
from .joint import HeadsOnly

__all__ = ["GeometricEnsemble", "ZTWEnsemble", "ZTWHeads", "load_ensemble", "save_ensemble"]


@register_objective("ztw_heads")
class ZTWHeads(HeadsOnly):
    """ZTW's head training: :class:`~eenn.objectives.HeadsOnly` (frozen backbone in eval mode,
    optional backbone ``checkpoint``) with the mean of the early exits' CE instead of the sum.
    Cascading comes from the network (``head_options={"cascade": True}``), not the loss."""

    def forward(self, outputs: ExitOutputs, targets: Tensor, indices: Tensor | None = None) -> dict[str, Tensor]:
        per_exit = exit_losses(outputs.logits, targets, self.label_smoothing)
        return {"loss": per_exit.mean(), "exit_losses": per_exit.detach()}


class GeometricEnsemble(nn.Module):
    """One weighted geometric ensemble per exit, over that exit and the ones before it.

    ``z_i = (1/i) Σ_{j≤i} exp(w_ij) log_softmax(h_j) + b_i`` (1-based i), so that
    ``softmax(z_i) ∝ exp(b_i) ∏_j p_j^{exp(w_ij)/i}``: a product of experts with positive
    exponents. ``weight [E, E]`` (only j ≤ i is used; the rest is masked out), ``bias [E, C]``.

    Init: w ~ N(0, 0.01²), i.e. standard deviation 0.01, as ZTW's ``torch.normal(0, 0.01)``
    (whose second argument is the std); METHODS.md's "N(0, 0.01)" is read that way. b = 0.
    [I] Unlike ZTW, which leaves its backbone's own head un-ensembled, the final exit gets an
    ensemble too (of every exit); it can learn to lean on the final exit, and keeping the
    output ``[E, B, C]`` lets the policies treat every exit alike.
    """

    def __init__(self, num_exits: int, num_classes: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.num_exits, self.num_classes = num_exits, num_classes
        self.weight = nn.Parameter(torch.randn(num_exits, num_exits) * init_std)
        self.bias = nn.Parameter(torch.zeros(num_exits, num_classes))

    def forward(self, logits: Tensor) -> Tensor:
        """``[E, B, C]`` exit logits -> ``[E, B, C]`` ensemble logits."""
        if logits.shape[0] != self.num_exits or logits.shape[-1] != self.num_classes:
            raise ValueError(f"GeometricEnsemble({self.num_exits} exits, {self.num_classes} classes) got logits "
                             f"of shape {tuple(logits.shape)}")
        return geometric_ensemble(logits, self.weight, self.bias)


@register_objective("ztw_ensemble")
class ZTWEnsemble(Objective):
    """Train a :class:`GeometricEnsemble` on a frozen network: ``L = Σ_i CE(z_i, y)``.

    The sum, not the mean: each exit's ensemble has its own parameters, so the sum gives each
    exactly the gradient of its own CE, i.e. ZTW's separately trained ensembles, at the learning
    rate given (a mean would divide every ensemble's rate by E). The network is frozen
    (``requires_grad`` False, eval mode) and its exits computed as usual; the ensemble is a
    submodule (``.ensemble``, built in ``prepare``), so the trainer optimises and checkpoints it.
    The logged ``ensemble_acc`` is the ensembles' training accuracy averaged over the exits
    (``train_acc`` stays the network's own exits').

    ``checkpoint``: an eenn checkpoint of this very network (backbone, exits and heads: the
    ``ztw_heads`` run's ``best.safetensors``) loaded before training; a checkpoint of another
    network is refused. Without it the network is taken as it is (trained in this process).
    """

    def __init__(self, init_std: float = 0.01, checkpoint: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.init_std = init_std
        self.checkpoint = checkpoint
        self.ensemble: GeometricEnsemble | None = None

    def prepare(self, net: MultiExitNetwork) -> None:
        if self.checkpoint is not None:
            from ..checkpoint import CheckpointError, load_weights

            try:
                load_weights(net, self.checkpoint)
            except CheckpointError as e:
                raise CheckpointError(f"ztw_ensemble: checkpoint= must hold this network, exits and heads included "
                                      f"(the ztw_heads run's weights): {e}") from None
        net.requires_grad_(False)
        ens = self.ensemble
        if ens is None or (ens.num_exits, ens.num_classes) != (net.num_exits, net.num_classes):
            device = next(net.parameters()).device
            self.ensemble = GeometricEnsemble(net.num_exits, net.num_classes, self.init_std).to(device)

    def train_mode(self, net: MultiExitNetwork) -> None:
        net.eval()  # frozen: BatchNorm statistics and dropout as at inference
        self.train()

    def forward(self, outputs: ExitOutputs, targets: Tensor, indices: Tensor | None = None) -> dict[str, Tensor]:
        if self.ensemble is None:
            raise RuntimeError("ztw_ensemble: prepare(net) must be called before the first step")
        z = self.ensemble(outputs.logits.detach())
        per_exit = exit_losses(z, targets)
        acc = (z.argmax(-1) == targets).float().mean()
        return {"loss": per_exit.sum(), "ensemble_acc": acc.detach()}


def save_ensemble(ensemble: GeometricEnsemble, path: str | os.PathLike) -> Path:
    """Write a trained ensemble to a safetensors file (tensors + a JSON description, no pickle)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"eenn_ensemble": json.dumps({"kind": "geometric", "num_exits": ensemble.num_exits,
                                         "num_classes": ensemble.num_classes})}
    tensors = {"weight": ensemble.weight.detach().cpu().contiguous(), "bias": ensemble.bias.detach().cpu().contiguous()}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_ensemble(path: str | os.PathLike, device: str | torch.device = "cpu") -> GeometricEnsemble:
    """Read an ensemble written by :func:`save_ensemble`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = (f.metadata() or {}).get("eenn_ensemble")
        if meta is None:
            raise ValueError(f"{path} holds no eenn ensemble (written by save_ensemble?)")
        desc = json.loads(meta)
        tensors = {k: f.get_tensor(k) for k in ("weight", "bias")}
    ens = GeometricEnsemble(desc["num_exits"], desc["num_classes"])
    ens.load_state_dict(tensors)
    return ens.to(device)
