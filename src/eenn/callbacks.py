"""Trainer callbacks: everything that happens *around* a training step (STYLE.md habit 5).

A callback overrides any of the hooks below. ``state_dict``/``load_state_dict`` let one keep
state across a resume (it is saved inside the ``last`` checkpoint).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .registry import is_whole

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["Callback", "Checkpointer", "EarlyStopping", "MetricsLogger", "ProgressBar", "monitored_value"]


class Callback:
    def on_fit_start(self, trainer: "Trainer") -> None: ...
    def on_epoch_start(self, trainer: "Trainer") -> None: ...
    def on_train_batch_end(self, trainer: "Trainer", batch: int, loss: Tensor, exit_acc: Tensor) -> None: ...
    def on_epoch_end(self, trainer: "Trainer", metrics: dict[str, Any]) -> None: ...
    def on_fit_end(self, trainer: "Trainer") -> None: ...

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        pass


def monitored_value(metrics: dict[str, Any], monitor: str) -> float:
    """The number ``monitor`` names, oriented so that larger is better."""
    if "val_acc" not in metrics:
        raise ValueError(f"monitoring {monitor!r} needs a validation split (val_fraction > 0)")
    if monitor == "val_acc_final":
        return metrics["val_acc"][-1]
    if monitor == "val_acc_mean":
        return sum(metrics["val_acc"]) / len(metrics["val_acc"])
    return -metrics["val_loss"][-1]  # val_loss of the final exit, negated


class EarlyStopping(Callback):
    """Stop when the monitored validation metric has not improved for ``patience`` epochs. A run
    resumed after it stopped stays stopped (its training is finished) unless ``patience`` grew.
    Its saved state names the monitor it compared: resumed under another, it compares anew."""

    MONITORS = ("val_acc_final", "val_acc_mean", "val_loss")

    def __init__(self, patience: int, monitor: str = "val_acc_final", min_delta: float = 0.0) -> None:
        self.patience, self.monitor, self.min_delta = patience, monitor, min_delta
        self.best = -math.inf
        self.bad_epochs = 0

    @property
    def stopped(self) -> bool:
        return self.bad_epochs >= self.patience

    def on_fit_start(self, trainer):
        if self.stopped:
            trainer.should_stop = True

    def on_epoch_end(self, trainer, metrics):
        value = monitored_value(metrics, self.monitor)
        if value > self.best + self.min_delta:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
            if self.stopped:
                trainer.should_stop = True

    def state_dict(self):
        return {"best": self.best, "bad_epochs": self.bad_epochs, "monitor": self.monitor}

    def load_state_dict(self, state):
        if _same_monitor(state, self.monitor):
            self.best, self.bad_epochs = _number(state, "best"), _count(state, "bad_epochs")


def _same_monitor(state: dict[str, Any] | None, monitor: str) -> bool:
    """Whether a saved comparison state applies to ``monitor`` (states written before they named
    their monitor are taken as the current one's)."""
    if state is None:
        return False
    if not isinstance(state, dict):
        raise TypeError(f"expected a mapping, got {type(state).__name__}")
    return state.get("monitor", monitor) == monitor


def _number(state: dict[str, Any], key: str) -> float:
    v = state.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
        raise ValueError(f"{key} must be a number, got {v!r}")
    return float(v)


def _count(state: dict[str, Any], key: str) -> int:
    v = state.get(key)
    if not is_whole(v, 0):
        raise ValueError(f"{key} must be a whole number >= 0, got {v!r}")
    return int(v)


class MetricsLogger(Callback):
    """Append one JSON line of metrics per epoch. On resume, lines of epochs that are about to be
    re-run (written after the last checkpoint) are dropped, so every epoch appears once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_fit_start(self, trainer):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("epoch", 0) <= trainer.start_epoch:
                        keep.append(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
            self.path.write_text("".join(f"{line}\n" for line in keep))

    def on_epoch_end(self, trainer, metrics):
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")


class Checkpointer(Callback):
    """Write ``last.safetensors`` (weights + optimiser, scheduler, RNG, epoch) after every epoch
    and ``best.safetensors`` whenever the monitored metric improves. ``best`` is written first:
    a kill between the two leaves a ``best`` at least as good as the one ``last``'s state records
    (the epoch is then trained again and compared with that). The saved state names its monitor:
    resumed under another, the comparison starts anew (the next epoch writes ``best``)."""

    def __init__(self, out_dir: str | Path, monitor: str = "val_acc_final") -> None:
        self.dir = Path(out_dir)
        self.monitor = monitor
        self.best = -math.inf

    def on_epoch_end(self, trainer, metrics):
        from .checkpoint import save

        improved = "val_acc" in metrics and monitored_value(metrics, self.monitor) > self.best
        if improved:
            self.best = monitored_value(metrics, self.monitor)
        extra = {"epoch": metrics["epoch"], "metrics": metrics}
        data = getattr(trainer, "data", None)
        if data is not None:  # which data set and split; its sizes, normalisation and names are net.input_spec
            split = getattr(data.info, "split", None)
            extra["data"] = {"name": data.info.name, **({"split": dict(split)} if split else {})}
        if improved or "val_acc" not in metrics:
            save(trainer.net, self.dir / "best.safetensors", extra=extra)
        save(trainer.net, self.dir / "last.safetensors", extra=extra, state=trainer.state_dict())

    def state_dict(self):
        return {"best": self.best, "monitor": self.monitor}

    def load_state_dict(self, state):
        if _same_monitor(state, self.monitor):
            self.best = _number(state, "best")


class ProgressBar(Callback):
    """A tqdm bar per epoch with the running loss and per-exit training accuracy."""

    def __init__(self, refresh_every: int = 10) -> None:
        self.every = refresh_every
        self.bar = None

    def on_epoch_start(self, trainer):
        from tqdm.auto import tqdm

        c = trainer.config
        # A bar only on a terminal; logs (CI, nohup) get the one summary line per epoch.
        self.bar = tqdm(total=len(trainer.train_loader), desc=f"epoch {trainer.epoch + 1}/{c.epochs}",
                        leave=False, file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                        disable=not sys.stderr.isatty())

    def on_train_batch_end(self, trainer, batch, loss, exit_acc):
        if self.bar is None:
            return
        self.bar.update(1)
        if batch % self.every == 0:
            acc = " ".join(f"{100 * a:.0f}" for a in exit_acc.tolist())
            self.bar.set_postfix_str(f"loss {loss.item():.3f} acc% [{acc}]", refresh=False)

    def on_epoch_end(self, trainer, metrics):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        val = metrics.get("val_acc")
        vtxt = f"  val acc% [{' '.join(f'{100 * a:.1f}' for a in val)}]" if val else ""
        print(f"epoch {metrics['epoch']}/{trainer.config.epochs}  loss {metrics['train_loss']:.4f}  "
              f"train acc% [{' '.join(f'{100 * a:.1f}' for a in metrics['train_acc'])}]{vtxt}  "
              f"({metrics['epoch_time']:.1f}s)", file=sys.stderr)
