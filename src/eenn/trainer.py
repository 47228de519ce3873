"""The trainer: a small loop over an objective (STYLE.md habits 4-5).

*What* a step computes belongs to the objective; *when* things happen belongs here. Progress,
metrics logging, checkpoints and early stopping are callbacks (``eenn.callbacks``). The same
code runs as one process or under ``torchrun`` with DistributedDataParallel.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed as D
from .callbacks import Callback, Checkpointer, EarlyStopping, MetricsLogger, ProgressBar
from .data import DataSplits, TensorDataset, TensorLoader
from .outputs import evaluate_exits
from .rng import rng_state, seed_everything
from .network import MultiExitNetwork
from .objectives import EpochContext, Objective, create_objective, describe_objective, exit_losses
from .devices import usable_device
from .train_state import (batch_norm_drop_last, check_labels, check_optimizer_state, check_same_run, checked_state,
                          claim_input_spec, restore_rng, restoring, resume_message)
from .train_config import TrainConfig, build_optimizer, build_scheduler, unused_momentum
from .userframe import caller_stacklevel

__all__ = ["TrainConfig", "Trainer", "fit", "evaluate_exits"]


class _Step(nn.Module):
    """Network + objective as one module, so DDP keeps the objective's own parameters (learned
    exit weights, say) in step across ranks too."""

    def __init__(self, net: MultiExitNetwork, objective: Objective) -> None:
        super().__init__()
        self.net, self.objective = net, objective

    def forward(self, x: Tensor, y: Tensor, idx: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
        out = self.net(x, exits=self.objective.exits)
        extra = {"indices": idx} if self.objective.needs_indices else {}
        return self.objective(out, y, **extra), out.logits


# settings that shape the learning-rate curve: a resume that changes one rebuilds the schedule
_SCHEDULE_KEYS = ("epochs", "schedule", "lr", "step_epochs", "gamma", "batch_size")


class Trainer:
    """``Trainer(config, callbacks).fit(net, data, objective)`` (the order of :func:`fit`).

    The loop calls, in order: ``objective.prepare`` once, then per epoch
    ``objective.begin_epoch`` and ``objective.train_mode``, one optimiser step per batch on
    ``objective(net(x, exits=objective.exits), y)["loss"]``, and validation. Callbacks see
    ``on_fit_start``, ``on_epoch_start``, ``on_train_batch_end``, ``on_epoch_end`` and
    ``on_fit_end``; the built-in ones are added from the config.
    """

    def __init__(self, config: TrainConfig | None = None, callbacks: Sequence[Callback] = ()) -> None:
        self.config = config or TrainConfig()
        self.config.validate()
        self.extra_callbacks = list(callbacks)
        self.should_stop = False
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------- set-up
    def _device(self) -> torch.device:
        if self.config.device:
            return usable_device(self.config.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _callbacks(self) -> list[Callback]:
        c = self.config
        cbs: list[Callback] = []
        if c.early_stopping:
            cbs.append(EarlyStopping(c.early_stopping, c.monitor))
        if c.out_dir:
            cbs += [MetricsLogger(Path(c.out_dir) / "metrics.jsonl"), Checkpointer(c.out_dir, c.monitor)]
        if c.progress:
            cbs.append(ProgressBar())
        return cbs

    # --------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything beyond the weights that an exact resume needs. Under torchrun it holds every
        rank's RNG state (gathered at the end of the epoch), so each rank resumes its own stream."""
        ranks = getattr(self, "_rank_rng", None)
        return {
            "epoch": self.epoch + 1,  # epochs completed
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            "objective_spec": describe_objective(self.objective),  # a resume under another objective is refused
            "rng": ranks[0] if ranks else rng_state(),
            **({"rng_ranks": ranks} if ranks and len(ranks) > 1 else {}),
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks if cb.state_dict() is not None},
            "config": asdict(self.config),
        }

    def _resume(self, path: Path) -> int:
        from .checkpoint import load_weights, load_state

        _, state = load_state(path)
        if state is None:
            raise ValueError(f"{path} holds no training state to resume from; delete it or set resume=False")
        check_same_run(path, self.data.info, self.objective, self.net.input_spec)
        saved = checked_state(state, path, self.config.epochs)
        if saved.get("optimizer", self.config.optimizer) != self.config.optimizer:
            raise ValueError(f"{path} was trained with optimizer {saved['optimizer']!r}, whose state cannot go on in "
                             f"{self.config.optimizer!r}: resume with optimizer {saved['optimizer']!r}, choose another "
                             "out_dir, or set resume=False to start again")
        load_weights(self.net, path)
        ignore = {"out_dir", "resume", "progress", "device", "early_stopping", "eval_batch_size", "dist_timeout"}
        changed = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in asdict(self.config).items()
                   if k not in ignore and k in saved and saved[k] != v]
        done = state["epoch"]
        reshaped = [k for k in _SCHEDULE_KEYS if k in saved and saved[k] != getattr(self.config, k)]
        with restoring(path, "objective"):
            self.objective.load_state_dict(state["objective"])
        with restoring(path, "optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
            check_optimizer_state(self.optimizer)
        for group in self.optimizer.param_groups:  # the saved groups hold the old settings: the current ones apply
            group["weight_decay"] = self.config.weight_decay
            if "momentum" in group and self.config.schedule != "onecycle":  # one-cycle sets it itself
                group["momentum"] = self.config.momentum
        if reshaped:
            lr = self._schedule_from(done)
            how = (f"the learning-rate schedule is rebuilt for the new {', '.join(reshaped)} and goes on from where "
                   f"{done} epoch(s) put it (lr {lr:.3g})")
        else:
            with restoring(path, "scheduler"):
                self.scheduler.load_state_dict(state["scheduler"])
            how = "the learning-rate schedule goes on as it was saved"
        if saved.get("monitor", self.config.monitor) != self.config.monitor:
            how += f"; best.safetensors and early stopping compare anew under {self.config.monitor}"
        for cb in self.callbacks:
            name = type(cb).__name__
            with restoring(path, f"callbacks.{name}"):
                cb.load_state_dict(state["callbacks"].get(name))
        with restoring(path, "rng"):
            restore_rng(state, path, self.env, self.config.seed)
        note = resume_message(path, changed, how, done, self.config.epochs, self.callbacks)
        if note:  # said after everything was restored: a refusal above leaves nothing to say
            warnings.warn(note, stacklevel=caller_stacklevel())
        return done

    def _restart_hint(self) -> str:
        """Where a diverged run goes on from: the last epoch saved, if any (the diverged one is not)."""
        last = Path(self.config.out_dir) / "last.safetensors" if self.config.out_dir else None
        if last is None or not last.exists():
            return ""
        return (f" (re-running resumes from {last}, the last epoch saved before it diverged; delete it or set "
                "train.resume=false to start again)")

    def _schedule_from(self, epochs_done: int) -> float:
        """The schedule of the current settings, where it is after ``epochs_done`` epochs (a resumed
        run whose epochs, learning rate or schedule changed: the saved schedule's state describes
        another curve; a one-cycle schedule saved for fewer epochs cannot even step past its end).
        Returns the learning rate the next batch gets."""
        steps = epochs_done * len(self.train_loader)
        for group in self.optimizer.param_groups:  # the saved groups hold the old curve's values
            group["lr"] = self.config.lr
            for k in ("initial_lr", "max_lr", "min_lr"):
                group.pop(k, None)
        self.scheduler = build_scheduler(self.config, self.optimizer, len(self.train_loader))
        with warnings.catch_warnings():  # stepped without optimiser steps, on purpose
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(min(steps, self.config.epochs * len(self.train_loader))):
                self.scheduler.step()
        return float(self.optimizer.param_groups[0]["lr"])

    # ---------------------------------------------------------------------------- loop
    def fit(self, net: MultiExitNetwork, data: DataSplits, objective: str | Objective) -> list[dict[str, Any]]:
        if isinstance(objective, DataSplits):
            raise TypeError("Trainer.fit takes (net, data, objective), in that order, like eenn.fit")
        if not all(hasattr(data, k) for k in ("train", "val", "info")):
            raise TypeError(f"Trainer.fit takes data as eenn.data.DataSplits (eenn.load_dataset(...), or "
                            f"eenn.data.from_tensors(train=(x, y), val=(x, y)) for tensors of your own), got "
                            f"{type(data).__name__}")
        claim_input_spec(net, data.info)
        check_labels(net, data)
        batch_norm_drop_last(net, len(data.train), self.config.batch_size)  # refusals before any set-up
        device = self._device()
        self.env = env = D.setup(device.type, self.config.dist_timeout)
        if env.enabled and device.type == "cuda":
            device = torch.device("cuda", env.local_rank)
            torch.cuda.set_device(device)
        try:
            return self._fit(net, data, objective, device, env)
        finally:
            D.teardown(env)

    def _fit(self, net, data, objective, device, env) -> list[dict[str, Any]]:
        c = self.config
        seed_everything(c.seed, c.deterministic)
        self.net = net.to(device)
        self.objective = obj = create_objective(objective).to(device)
        if c.label_smoothing:
            if not hasattr(obj, "label_smoothing"):
                raise ValueError(f"objective {type(obj).__name__} does not take label_smoothing")
            obj.label_smoothing = c.label_smoothing
        obj.prepare(net)
        self.data, self.device = data, device
        drop_last = batch_norm_drop_last(net, len(data.train), c.batch_size, env)
        self._loader_args = dict(shuffle=True, drop_last=drop_last, input_spec=net.input_spec, augment=c.augment,
                                 crop_padding=c.crop_padding, flip=c.flip, device=device, seed=c.seed,
                                 rank=env.rank, world_size=env.world_size, return_indices=obj.needs_indices)
        self.train_loader = TensorLoader(data.train, c.batch_size, **self._loader_args)
        if len(self.train_loader) == 0:
            raise ValueError(f"the training split ({len(data.train)} samples) is smaller than one batch")
        step = _Step(net, obj)
        if env.enabled:
            self.model = DistributedDataParallel(step, find_unused_parameters=_has_unused_parameters(step, data.train))
        else:
            self.model = step
        params = [p for p in step.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every parameter is frozen")
        self.optimizer = build_optimizer(c, params)
        unused = unused_momentum(c)
        if unused and env.is_main:
            warnings.warn(unused, UserWarning, stacklevel=caller_stacklevel())
        self.scheduler = build_scheduler(c, self.optimizer, len(self.train_loader))
        # The built-in callbacks write files and draw bars: rank 0 only. The user's run everywhere.
        self.callbacks = (self._callbacks() if env.is_main else []) + self.extra_callbacks
        torch.manual_seed(c.seed + env.rank)  # dropout differs per rank; weights are rank 0's (DDP)
        self._rank_rng = None
        start = 0
        last = Path(c.out_dir) / "last.safetensors" if c.out_dir else None
        if c.resume and last is not None and last.exists():
            start = self._resume(last)
        self.epoch, self.start_epoch, self.should_stop = start - 1, start, False
        for cb in self.callbacks:
            cb.on_fit_start(self)
        # a resumed run that early stopping had ended is finished (EarlyStopping says so on rank 0)
        self.should_stop = D.broadcast_flag(self.should_stop, env, device, "rank 0's stop decision on resuming")
        if self.should_stop and start and env.is_main:
            warnings.warn(f"nothing to train: {last} records a run that stopped early after epoch {start} (raise "
                          "early_stopping to go on, or delete it to start again)", UserWarning,
                          stacklevel=caller_stacklevel())
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=c.amp and device.type == "cuda")
        for epoch in range(start, c.epochs if not self.should_stop else start):
            self.epoch = epoch
            metrics = self._train_epoch(epoch, autocast)
            # Each rank has moved rank 0's BatchNorm statistics with its own last batch: make them
            # one (see D.sync_buffers for the rule) before they are validated or saved.
            D.sync_buffers(step.buffers(), env, f"the buffer synchronisation after epoch {epoch + 1}")
            val = evaluate_exits(net, data.val, batch_size=c.eval_batch_size, device=device,
                                 env=env) if len(data.val) else None
            if val is not None:
                metrics.update(val_loss=val["loss"], val_acc=val["acc"])
                if not all(math.isfinite(v) for v in val["loss"]):  # diverged: this epoch is not saved
                    raise FloatingPointError(f"the validation loss became {val['loss']} after epoch {epoch + 1}: the "
                                             "weights diverged; lower the learning rate or enable grad_clip"
                                             f"{self._restart_hint()}")
            if env.enabled:  # every rank's RNG stream, for rank 0's checkpoint
                self._rank_rng = D.all_gather_objects(rng_state(), env, f"gathering RNG states after epoch {epoch + 1}")
            self.history.append(metrics)
            for cb in self.callbacks:
                cb.on_epoch_end(self, metrics)
            self.should_stop = D.broadcast_flag(self.should_stop, env, device,
                                                f"rank 0's stop decision after epoch {epoch + 1}")
            if self.should_stop:
                break
        for cb in self.callbacks:
            cb.on_fit_end(self)
        D.barrier(env)
        return self.history

    def _train_epoch(self, epoch: int, autocast) -> dict[str, Any]:
        c, env, net = self.config, self.env, self.net
        spec = net.input_spec
        ctx = EpochContext(epoch, c.epochs, net, self.data.train, spec.mean, spec.std, self.device, c.seed)
        held_out = self.objective.begin_epoch(ctx)
        keep = None
        if held_out is not None:  # this epoch trains on the rest (e.g. NACHOS' support set is held out)
            mask = torch.ones(len(self.data.train), dtype=torch.bool)
            mask[held_out.cpu()] = False
            keep = mask.nonzero().squeeze(1)
            loader = TensorLoader(self.data.train.subset(keep), c.batch_size, **self._loader_args)
        else:
            loader = self.train_loader
        loader.set_epoch(epoch)
        self.objective.train_mode(net)
        for cb in self.callbacks:
            cb.on_epoch_start(self)
        exits = list(range(net.num_exits)) if self.objective.exits is None else \
            sorted({e % net.num_exits for e in self.objective.exits})
        dev = self.device
        # Running sums stay on the device; nothing is synchronised per batch but the progress bar.
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        exit_loss = torch.zeros(len(exits), dtype=torch.float64, device=dev)
        correct = torch.zeros(len(exits), dtype=torch.float64, device=dev)
        parts: dict[str, Tensor] = {}
        seen = 0
        t0 = time.perf_counter()
        keep = keep.to(dev) if keep is not None else None
        i = -1  # named lazily by the collective below, only if a rank gives up waiting
        # DDP's buffer broadcast and gradient all-reduce run inside every step of this loop.
        with D.collective(lambda: f"training step {i + 1} of epoch {epoch + 1} (DDP's buffer broadcast or "
                          "gradient all-reduce)", env):
            for i, batch in enumerate(loader):
                x, y = batch[0], batch[1]
                idx = None
                if len(batch) == 3:  # indices into the full training split
                    idx = batch[2] if keep is None else keep[batch[2]]
                with autocast:
                    out, logits = self.model(x, y, idx)
                loss = out["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss became {loss.item()} at epoch {epoch + 1}, batch {i + 1}; "
                                             f"lower the learning rate or enable grad_clip{self._restart_hint()}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if c.grad_clip:
                    nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], c.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                with torch.no_grad():
                    n = y.numel()
                    logits = logits.float()
                    loss_sum += loss.detach().double() * n
                    # Objectives that already computed every exit's CE hand it over (no work twice).
                    el = out.get("exit_losses")
                    if el is None or el.shape != (len(exits),):
                        el = exit_losses(logits, y)
                    exit_loss += el.double() * n
                    correct += (logits.argmax(-1) == y).sum(1).double()
                    for k, v in out.items():
                        if k != "loss" and isinstance(v, Tensor) and v.dim() == 0:
                            parts[k] = parts.get(k, 0) + v.detach().double() * n
                    seen += n
                for cb in self.callbacks:
                    cb.on_train_batch_end(self, i, loss, correct / seen)
        total = torch.tensor([float(seen)], dtype=torch.float64, device=dev)
        for t in (loss_sum, exit_loss, correct, total, *parts.values()):
            D.all_reduce_sum(t, env, f"the reduction of epoch {epoch + 1}'s training metrics")
        n = total.item()
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum.item() / n,
            "train_exits": exits,
            "train_exit_loss": (exit_loss / n).tolist(),
            "train_acc": (correct / n).tolist(),
            "epoch_time": time.perf_counter() - t0,
        }
        metrics.update({f"train_{k}": v.item() / n for k, v in parts.items()})
        return metrics


def _has_unused_parameters(step: _Step, train: TensorDataset) -> bool:
    """Whether some trainable parameter gets no gradient from the loss (a gate that the loss does
    not read, say): DDP must then look for them every step, which costs a graph traversal, so
    it is only asked to when one backward pass on two samples shows it is needed."""
    dev = next(step.parameters()).device
    x, y = next(iter(TensorLoader(train.subset(torch.arange(min(2, len(train)))), 2,
                                  input_spec=step.net.input_spec, device=dev)))
    was = step.training
    step.eval()  # no BatchNorm statistics move, no dropout randomness is drawn
    step(x, y, torch.arange(len(y), device=dev))[0]["loss"].backward()
    step.train(was)
    params = [p for p in step.parameters() if p.requires_grad]
    unused = any(p.grad is None for p in params)
    for p in params:
        p.grad = None
    return unused


def fit(net: MultiExitNetwork, data: DataSplits, objective: str | Objective = "joint",
        callbacks: Sequence[Callback] = (), **config: Any) -> list[dict[str, Any]]:
    """One-call training: ``eenn.fit(net, data, "joint", epochs=5, lr=0.05, out_dir="runs/a")``.
    ``data``: a data set's splits (:func:`eenn.load_dataset`) or your own tensors'
    (:func:`eenn.data.from_tensors`: uint8 pixels, token ids or float features)."""
    unknown = set(config) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown training option(s) {', '.join(sorted(unknown))}; "
                         f"valid: {', '.join(TrainConfig.__dataclass_fields__)}")
    return Trainer(TrainConfig(**config), callbacks).fit(net, data, objective)
