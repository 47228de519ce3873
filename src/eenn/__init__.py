"""eenn: early-exit neural networks for PyTorch.

The names a user needs, by layer (the modules behind them, bottom to top):

- model: ``create_network``, ``attach_exits``, ``MultiExitNetwork``, ``InputSpec``, ``CostTable``,
  ``create_backbone``/``create_head`` (``backbones``, ``heads``, ``network``, ``trace``, ``cost``);
- data: ``load_dataset``, ``from_tensors``, ``TensorLoader`` (``data``);
- train: ``fit``, ``Trainer``, ``TrainConfig``, ``create_objective`` (``objectives``, ``trainer``);
- infer: ``collect_outputs``, ``ExitPolicy``, ``calibrate``, ``Goal``, ``DynamicEngine``,
  ``evaluate`` (``outputs``, ``policies``, ``engine``, ``inference``, ``report``);
- deploy: ``export``, ``StagedRunner``, ``aep_prune`` (``exporter``, ``staged``, ``serve``, ``prune``);
- files: ``save``, ``load`` (``checkpoint``).
"""
__version__ = "0.1.0"

from .backbones import Backbone, StageInfo, create_backbone, list_backbones, register_backbone
from .checkpoint import CheckpointError, load, read_description, save
from .cost import CostTable
from .data import InputSpec, TensorLoader, from_tensors, list_datasets, load_dataset
from .heads import ExitHead, create_head, list_heads, register_head
from .network import ExitOutputs, MultiExitNetwork, NetworkConfig, create_network, place_exits
from .trace import TraceError, attach_exits
from .objectives import Objective, create_objective, list_objectives, register_objective
from .trainer import TrainConfig, Trainer, fit
from .outputs import CachedOutputs, collect_outputs
from . import hf, policies
from .policies import ExitPolicy, Goal, calibrate
from .engine import DynamicEngine
from .report import evaluate
from .exporter import export
from .staged import StagedRunner
from .prune import aep_prune

__all__ = [
    # model
    "Backbone", "CostTable", "ExitHead", "ExitOutputs", "InputSpec", "MultiExitNetwork", "NetworkConfig",
    "StageInfo", "TraceError", "attach_exits", "create_backbone", "create_head", "create_network", "list_backbones",
    "list_heads", "place_exits", "register_backbone", "register_head",
    # data
    "TensorLoader", "from_tensors", "list_datasets", "load_dataset",
    # train
    "Objective", "TrainConfig", "Trainer", "create_objective", "fit", "list_objectives", "register_objective",
    # infer
    "CachedOutputs", "DynamicEngine", "ExitPolicy", "Goal", "calibrate", "collect_outputs", "evaluate", "policies",
    # deploy
    "StagedRunner", "aep_prune", "export",
    # files
    "CheckpointError", "load", "read_description", "save",
]
