"""What a training method is: an objective (STYLE.md habit 4).

An objective takes the network's outputs and the targets and returns a dict with ``loss`` and
the parts worth logging. The trainer never knows which method it trains; it only calls the
generic hooks below, whose defaults do nothing special.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..data import TensorDataset
from ..network import ExitOutputs, MultiExitNetwork
from ..registry import Registry, check_options

__all__ = ["EpochContext", "Objective", "create_objective", "describe_objective", "list_objectives",
           "register_objective"]


@dataclass
class EpochContext:
    """What an objective may look at when an epoch begins (e.g. to draw a support set)."""

    epoch: int  # 0-based
    num_epochs: int
    net: MultiExitNetwork
    train: TensorDataset  # the full training split (this rank's view of it is the loader's)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    seed: int

    def normalise(self, x: Tensor) -> Tensor:
        """Samples from ``train`` -> the input the network is trained on, on ``device``: uint8
        images by the loader's own arithmetic (:func:`eenn.data.spec.normalize`); token ids and
        float features are model inputs as they are."""
        from ..data.spec import normalize

        x = x.to(self.device)
        return normalize(x, self.mean, self.std) if x.dtype == torch.uint8 else x

    def generator(self, stream: int = 0) -> torch.Generator:
        """A CPU generator that is the same on every DDP rank for this (seed, epoch, stream)."""
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + stream) % (2**62))


class Objective(nn.Module):
    """Base class. An objective may own parameters (e.g. learned exit weights); the trainer
    optimises them with the network's and keeps them in step across DDP ranks."""

    #: Exits whose outputs the loss reads (indices, negative allowed); None = all. Exits not
    #: listed are not computed during training.
    exits: Sequence[int] | None = None

    def prepare(self, net: MultiExitNetwork) -> None:
        """Called once before training: check the network fits, freeze parts, read its cost."""

    def train_mode(self, net: MultiExitNetwork) -> None:
        """Put ``net`` in training mode (a frozen part may stay in eval mode)."""
        net.train()

    #: Whether ``forward`` wants the training samples' indices (``indices=`` keyword), for
    #: per-sample state such as EENets v4's exit tags.
    needs_indices: bool = False

    def begin_epoch(self, ctx: EpochContext) -> Tensor | None:
        """Called at the start of every epoch, for schedules over training. May return indices
        of training samples to hold out of this epoch's batches (NACHOS' support set)."""
        return None

    def forward(self, outputs: ExitOutputs, targets: Tensor, indices: Tensor | None = None) -> dict[str, Tensor]:
        raise NotImplementedError


_OBJECTIVES: Registry[Callable[..., Objective]] = Registry("objective")


def register_objective(name: str | None = None):
    """Decorator: register an :class:`Objective` subclass (or factory) under ``name``."""
    return _OBJECTIVES.register(name)


def list_objectives() -> list[str]:
    return _OBJECTIVES.names()


def create_objective(name: str | Objective, **options: Any) -> Objective:
    """Build a registered objective; an :class:`Objective` instance is returned as it is."""
    if isinstance(name, Objective):
        if options:
            raise ValueError("options cannot be given together with an Objective instance")
        return name
    factory = check_objective(name, options)
    obj = factory(**options)
    # what a checkpoint records of the method (a resume under another is refused): the name and
    # every option, defaults included, so that leaving out a default compares equal to giving it
    defaults = {n: p.default for n, p in inspect.signature(factory).parameters.items()
                if n != "self" and p.default is not p.empty}
    obj.objective_spec = {"name": name, "options": _jsonable({**defaults, **options})}
    return obj


def describe_objective(obj: Objective) -> dict[str, Any]:
    """``{"name", "options"}`` of an objective made by :func:`create_objective` (by name); for
    one built from its class, the registered name only (its options are not known)."""
    spec = getattr(obj, "objective_spec", None)
    if isinstance(spec, dict):
        return spec
    name = next((n for n in _OBJECTIVES.names() if _OBJECTIVES.get(n) is type(obj)), type(obj).__name__)
    return {"name": name}


def _jsonable(value: Any) -> Any:
    """Options as JSON data (paths and other objects as their text), to be stored and compared."""
    return json.loads(json.dumps(value, default=str))


def check_objective(name: str, options: dict[str, Any]):
    """The registered objective's factory, once ``name`` and ``options`` are known to fit it
    (nothing built: a config names its mistakes before anything trains)."""
    factory = _OBJECTIVES.get(name)
    check_options(f"objective {name!r}", factory.__init__ if isinstance(factory, type) else factory, options, skip=("self",))
    return factory
