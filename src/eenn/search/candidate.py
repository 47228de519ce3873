"""One candidate design of the search, without Optuna: the data it is trained on, its training on
the proxy budget, the calibration of its exit thresholds on the validation split and their repair
against the MAC ceiling, and the figures a trial reports (:mod:`eenn.search.study` drives the
trials).
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any

import torch

from ..callbacks import Callback
from ..cost import CostTable
from ..data import DataSplits, load_dataset
from ..data.core import cap
from ..outputs import CachedOutputs, collect_outputs
from ..policies import ExitPolicy, Goal, calibrate, evaluate_policy
from .config import GRID_POLICIES, SearchConfig
from .space import ConfigError, Design

__all__ = ["NACHOS_GRID", "Pruned", "evaluate_design", "load_search_data", "nachos_epsilon", "repair_thresholds"]


# ------------------------------------------------------------------------------------------ data
def load_search_data(config: SearchConfig) -> DataSplits:
    """The data set with the search's own caps per split (stratified, seeded)."""
    ds = config.dataset
    data = load_dataset(ds["name"], data_dir=ds.get("data_dir"), download=bool(ds.get("download", False)),
                        val_fraction=ds["val_fraction"], seed=ds["seed"])
    splits = {}
    for i, part in enumerate(("train", "val", "test")):
        # streams 11-13: independent of load_dataset's own val carve-out and limit streams
        splits[part] = cap(getattr(data, part), ds.get(f"{part}_limit"), (ds["seed"], 11 + i))
    if len(splits["val"]) == 0:
        raise ConfigError("dataset: the validation split is empty; thresholds are calibrated on it (raise val_fraction)")
    return dataclasses.replace(data, **splits)


def _shape_kw(data: DataSplits) -> dict[str, Any]:
    info = data.info
    return {"num_classes": info.num_classes, "in_channels": info.in_channels, "input_size": tuple(info.input_size)}


# ------------------------------------------------------------------------------- NACHOS' ε grid
NACHOS_GRID = (0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8)


def nachos_epsilon(policy: ExitPolicy, val_cache: CachedOutputs, cost: CostTable, *,
                   grid=NACHOS_GRID, first_min: float = 0.7) -> ExitPolicy:
    """NACHOS' own threshold tuning (METHODS.md §4; its ``ee_train.py``): one ε for every early
    exit from ``grid``, the first exit's raised to at least ``first_min``, and of those the ε
    with the best validation accuracy (on ties the smaller one, as NACHOS' strict comparison
    keeps the first found). For rules whose scores are probabilities (``cumulative``, NACHOS'
    own, and ``gate``, ``max_prob``, ``margin``)."""
    if policy.name not in GRID_POLICIES:
        raise ValueError(f"NACHOS' ε grid sets thresholds in [0, 1] for {', '.join(GRID_POLICIES)}; "
                         f"not for {policy.name!r}")
    e = val_cache.logits.shape[0]
    best = None
    for eps in grid:
        th = [max(first_min, eps), *[eps] * (e - 2)][: e - 1]
        candidate = policy.replace(thresholds=th)
        acc = evaluate_policy(candidate, val_cache, cost)["accuracy"]
        if best is None or acc > best[0]:
            best = (acc, candidate)
    return best[1]


# ---------------------------------------------------------------------------------------- repair
def repair_thresholds(policy: ExitPolicy, val_cache: CachedOutputs, cost: CostTable, *,
                      accuracy_floor: float, macs_ceiling: float) -> tuple[ExitPolicy, bool]:
    """NACHOS' repair step (METHODS.md §4): when a design holds the accuracy floor but its expected
    MACs exceed the ceiling, lower its thresholds until the ceiling holds, as long as the accuracy
    stays at or above the floor. NACHOS walks the thresholds down by 0.1, last early exit first;
    here the walk is eenn's exact threshold search (:func:`eenn.policies.calibrate` with
    ``Goal(budget=ceiling)``: the most accurate thresholds whose expected MACs fit), kept only if
    that accuracy reaches the floor. Returns ``(policy, repaired)``; unchanged when the
    design already fits or cannot be repaired."""
    now = evaluate_policy(policy, val_cache, cost)
    if now["expected_macs"] <= macs_ceiling or now["accuracy"] < accuracy_floor:
        return policy, False
    fitted = calibrate(policy, val_cache, cost, Goal(budget=macs_ceiling))
    r = evaluate_policy(fitted, val_cache, cost)
    if r["expected_macs"] <= macs_ceiling and r["accuracy"] >= accuracy_floor:
        return fitted, True
    return policy, False


# ------------------------------------------------------------------------------------ one design
class _FirstEpochPruner(Callback):
    """Stops a candidate whose best exit is below ``threshold`` on validation after epoch 1."""

    def __init__(self, threshold: float | None) -> None:
        self.threshold, self.pruned, self.first = threshold, False, None

    def on_epoch_end(self, trainer, metrics: dict[str, Any]) -> None:
        if metrics["epoch"] != 1 or "val_acc" not in metrics:
            return
        self.first = max(metrics["val_acc"])
        if self.threshold is not None and trainer.config.epochs > 1 and self.first < self.threshold:
            self.pruned = True
            trainer.should_stop = True


class Pruned(Exception):
    """A candidate given up before or during training; ``attrs`` say why and what is known."""

    def __init__(self, reason: str, attrs: dict[str, Any]) -> None:
        super().__init__(reason)
        self.attrs = {"pruned_reason": reason, **attrs}


def evaluate_design(config: SearchConfig, design: Design, data: DataSplits, *, device: str | None = None) -> dict[str, Any]:
    """Train ``design`` on the proxy budget and measure it: validation accuracy and expected MACs
    after calibration and repair, and the same thresholds' figures on the test split. Raises
    :class:`Pruned` for a hopeless candidate."""
    from ..trainer import TrainConfig, Trainer

    torch.manual_seed(config.seed)
    net = design.build()
    cost = net.cost()
    floor, ceiling = config.accuracy_floor, config.macs_ceiling
    lower = min(cost.dynamic_macs)
    base = {"full_macs": float(cost.macs[-1]), "macs_lower_bound": float(lower), "params": int(cost.total_params)}
    if lower > ceiling:
        raise Pruned(f"even its cheapest exit costs {lower:,} MACs > the ceiling {ceiling:,.0f}; not trained",
                     {**base, "val_accuracy": 0.0, "val_macs": float(lower)})
    pruner = _FirstEpochPruner(config.prune_below)
    train = {**config.train, "seed": config.seed, "out_dir": None, "resume": False}
    if device is not None:
        train["device"] = device
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. NACHOS' "the ceiling never binds" for a small design
        from ..objectives import create_objective

        objective = create_objective(config.objective, **config.objective_options)
        Trainer(TrainConfig(**train), [pruner]).fit(net, data, objective)
    seconds = time.perf_counter() - t0
    if pruner.pruned:
        raise Pruned(f"best exit reached {pruner.first:.3f} validation accuracy after epoch 1 (< {config.prune_below})",
                     {**base, "val_accuracy": float(pruner.first), "val_macs": float(lower), "train_seconds": seconds})
    val = collect_outputs(net, data.val)  # normalised by net.input_spec, which fit set
    policy = ExitPolicy(config.policy, fallback=config.fallback)
    if config.calibration == "nachos":
        fitted = nachos_epsilon(policy, val, cost)
    else:
        fitted = calibrate(policy, val, cost, Goal(max_drop=config.max_drop))
    fitted, repaired = repair_thresholds(fitted, val, cost, accuracy_floor=floor, macs_ceiling=ceiling)
    rv = evaluate_policy(fitted, val, cost)
    out = {**base, "train_seconds": seconds, "thresholds": [float(t) for t in fitted.thresholds.tolist()],
           "repaired": repaired,
           "val_accuracy": rv["accuracy"], "val_macs": rv["expected_macs"], "val_final_accuracy": rv["final_accuracy"],
           "val_exit_distribution": rv["exit_distribution"], "exit_macs": [float(m) for m in cost.dynamic_macs]}
    if len(data.test):
        test = collect_outputs(net, data.test)
        rt = evaluate_policy(fitted, test, cost)
        out.update(test_accuracy=rt["accuracy"], test_macs=rt["expected_macs"], test_final_accuracy=rt["final_accuracy"],
                   test_exit_distribution=rt["exit_distribution"])
    return out
