"""The training configuration, and what is built from it alone: the optimiser and the
learning-rate schedule. The loop that uses them is :mod:`eenn.trainer`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch
from torch import nn

from . import distributed as D
from .callbacks import EarlyStopping

__all__ = ["OPTIMIZERS", "SCHEDULES", "TrainConfig", "build_optimizer", "build_scheduler", "unused_momentum"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "step", "constant")


@dataclass
class TrainConfig:
    """Everything the loop needs; entry points fill it from flags or YAML (habit 9).

    ``momentum`` is SGD's. The ``onecycle`` schedule cycles the momentum itself (SGD's momentum,
    AdamW's beta1: 0.95 down to 0.85 and back, PyTorch's OneCycleLR), so a momentum given with it
    is not used (the trainer warns); AdamW has none (its beta1 is 0.9)."""

    epochs: int = 10
    batch_size: int = 128  # per process under torchrun
    eval_batch_size: int = 512
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9  # SGD's; not used by onecycle, which cycles it between 0.85 and 0.95, nor by adamw
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # per-step cosine annealing, one-cycle, step decay or constant
    step_epochs: int = 30  # "step": multiply the rate by `gamma` every `step_epochs` epochs
    gamma: float = 0.1
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global gradient norm
    amp: bool = False  # bf16 autocast (CUDA only; ignored on CPU)
    augment: bool = False  # random crop (zero padding `crop_padding`) + horizontal flip (if `flip`)
    crop_padding: int = 4
    flip: bool = True
    seed: int = 0
    deterministic: bool = False
    device: str | None = None  # None: CUDA when present
    out_dir: str | None = None  # metrics.jsonl, last.safetensors, best.safetensors
    resume: bool = True  # continue from out_dir/last.safetensors when it exists
    early_stopping: int | None = None  # patience in epochs
    monitor: str = "val_acc_final"  # or "val_acc_mean", "val_loss"
    progress: bool = True
    dist_timeout: float = D.DEFAULT_TIMEOUT  # seconds a rank waits on the others under torchrun before it stops

    def __post_init__(self) -> None:
        # a Path or a torch.device as given: kept as text, as a config file and the saved state hold them
        if isinstance(self.out_dir, os.PathLike):
            self.out_dir = os.fspath(self.out_dir)
        if isinstance(self.device, torch.device):
            self.device = str(self.device)

    def validate(self) -> None:
        for f in fields(self):  # a number where a number goes (a config's "abc" would fail a comparison below)
            v, d = getattr(self, f.name), f.default
            if type(d) in (int, float) and not (isinstance(v, (int, float)) and not isinstance(v, bool)):
                raise ValueError(f"{f.name} must be a number, got {v!r}")
            if type(d) is int and not isinstance(v, int):
                raise ValueError(f"{f.name} must be a whole number, got {v!r}")
            if type(d) is bool and not isinstance(v, bool):
                raise ValueError(f"{f.name} must be true or false, got {v!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose {', '.join(SCHEDULES)}")
        if self.monitor not in EarlyStopping.MONITORS:
            raise ValueError(f"unknown monitor {self.monitor!r}; choose {', '.join(EarlyStopping.MONITORS)}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("step_epochs", "early_stopping"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 epoch{' (or None: off)' if name == 'early_stopping' else ''}, "
                                 f"got {v}")
        # not NaN either: each test reads "within range", which NaN never is
        for name, ok, rule in (("lr", self.lr > 0, "> 0"), ("dist_timeout", self.dist_timeout > 0, "> 0 seconds"),
                               ("gamma", self.gamma > 0, "> 0"), ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                               ("weight_decay", self.weight_decay >= 0, ">= 0"),
                               ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
                               ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "> 0 (or None: off)"),
                               ("seed", 0 <= self.seed < 2**32, "in [0, 2**32 - 1] (NumPy's seeds)"),
                               ("crop_padding", self.crop_padding >= 0, ">= 0")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"device {self.device!r} is not a device: use cpu, cuda or cuda:N (None: cuda when "
                                 "present)") from None


def unused_momentum(config: TrainConfig) -> str | None:
    """Why a ``momentum`` other than the default is not used (one line), or None when it is."""
    c = config
    if c.momentum == TrainConfig.momentum:
        return None
    if c.schedule == "onecycle":
        what = "AdamW's beta1" if c.optimizer == "adamw" else "the momentum"
        return (f"momentum {c.momentum} is not used: the onecycle schedule cycles {what} between 0.85 and 0.95; "
                "choose another schedule to set it")
    if c.optimizer == "adamw":
        return f"momentum {c.momentum} is not used: adamw has no momentum setting (its beta1 is 0.9)"
    return None


def build_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    c = config
    if c.optimizer == "sgd":
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)


def build_scheduler(config: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """Stepped once per batch: ``step_epochs`` and the cosine/one-cycle lengths count batches."""
    c = config
    total = max(1, c.epochs * steps_per_epoch)
    if c.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if c.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=total)
    if c.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, c.step_epochs * steps_per_epoch), gamma=c.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
