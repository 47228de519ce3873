"""Training objectives, one file per method; each returns a dict with ``loss``.

Registered names (``eenn.list_objectives()``): ``final``, ``joint``, ``heads_only`` (baselines),
``branching`` (Scardapane et al.), ``eenets`` (Demir & Akbas), ``aep`` (Sarti et al.),
``nachos`` (Gambella et al.), ``distill`` (self-distillation), ``ztw_heads`` and
``ztw_ensemble`` (Zero Time Waste).
"""
from .base import EpochContext, Objective, create_objective, describe_objective, list_objectives, register_objective
from .joint import Final, HeadsOnly, Joint, exit_losses
from .branching import Branching
from .eenets import EENets
from .aep import AEP
from .nachos import NACHOS
from .distill import SelfDistill
from .ztw import GeometricEnsemble, ZTWEnsemble, ZTWHeads

__all__ = ["AEP", "Branching", "EENets", "EpochContext", "Final", "GeometricEnsemble", "HeadsOnly", "Joint",
           "NACHOS", "Objective", "SelfDistill", "ZTWEnsemble", "ZTWHeads", "create_objective", "describe_objective",
           "exit_losses", "list_objectives", "register_objective"]
