"""eenn: early-exit neural networks for PyTorch."""
__version__ = "0.1.0"

from .backbones import Backbone, StageInfo, create_backbone, list_backbones, register_backbone
from .checkpoint import CheckpointError, load, read_description, save
from .cost import CostTable
from .data import InputSpec, TensorLoader, list_datasets, load_dataset
from .heads import ExitHead, create_head, list_heads, register_head
from .network import ExitOutputs, MultiExitNetwork, NetworkConfig, create_network, place_exits
from .trace import TraceError, attach_exits
from .objectives import Objective, create_objective, list_objectives, register_objective
from .trainer import TrainConfig, Trainer, fit
from .prune import EnsembleClassifier, aep_prune, load_pruned, save_pruned
from . import policies

__all__ = [
    "EnsembleClassifier",
    "aep_prune",
    "load_pruned",
    "save_pruned",
    "Objective",
    "TrainConfig",
    "Trainer",
    "create_objective",
    "fit",
    "list_objectives",
    "register_objective",
    "Backbone",
    "CheckpointError",
    "CostTable",
    "ExitHead",
    "ExitOutputs",
    "InputSpec",
    "MultiExitNetwork",
    "NetworkConfig",
    "StageInfo",
    "TensorLoader",
    "TraceError",
    "attach_exits",
    "create_backbone",
    "create_head",
    "create_network",
    "list_backbones",
    "list_datasets",
    "list_heads",
    "load",
    "load_dataset",
    "place_exits",
    "read_description",
    "register_backbone",
    "register_head",
    "save",
]
