"""What a training method is: an objective (STYLE.md habit 4).

An objective takes the network's outputs and the targets and returns a dict with ``loss`` and
the parts worth logging. The trainer never knows which method it trains; it only calls the
generic hooks below, whose defaults do nothing special.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import Tensor, nn

from ..network import ExitOutputs, MultiExitNetwork
from ..registry import Registry, check_options

__all__ = ["Objective", "create_objective", "list_objectives", "register_objective"]


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

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        """Called at the start of every epoch (0-based), for schedules over training."""

    def forward(self, outputs: ExitOutputs, targets: Tensor) -> dict[str, Tensor]:
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
    factory = _OBJECTIVES.get(name)
    check_options(f"objective {name!r}", factory.__init__ if isinstance(factory, type) else factory, options, skip=("self",))
    return factory(**options)
