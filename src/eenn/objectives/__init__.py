"""Training objectives (one file per method); each returns a dict with ``loss``."""
from .base import EpochContext, Objective, create_objective, list_objectives, register_objective
from .joint import Final, HeadsOnly, Joint, exit_losses

__all__ = ["EpochContext", "Final", "HeadsOnly", "Joint", "Objective", "create_objective", "exit_losses", "list_objectives", "register_objective"]
