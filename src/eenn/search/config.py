"""The search configuration: one mapping (a YAML file) with the sections below, checked key by key
so that a typo is an error naming the key, not a silently ignored setting.

    name: digits-resnet            # default study name
    dataset: {name: digits, val_fraction: 0.2, seed: 0, train_limit: null, val_limit: null, test_limit: null}
    space: {...}                   # see eenn.search.space
    constraints: {accuracy_floor: 0.9, macs_ceiling: 150000}
    objective: {name: joint, options: {}}         # or nachos (its mmax defaults to the MAC ceiling)
    policy: {name: max_prob, max_drop: 0.01, fallback: final, calibration: fit}   # or nachos: its ε grid
    train: {epochs: 2, ...}        # the proxy budget: eenn.TrainConfig fields
    retrain: {epochs: 30}          # written into each design's config for its full training
    search: {trials: 16, sampler: nsga2, population: 8, seed: 0, prune_below: null}
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..policies import ExitPolicy, list_policies
from .space import ConfigError, SearchSpace

__all__ = ["SAMPLERS", "SearchConfig", "load_config"]

SAMPLERS = ("nsga2", "tpe", "gp", "random")
_SECTIONS = ("name", "dataset", "space", "constraints", "objective", "policy", "train", "retrain", "search")
_DATASET_KEYS = ("name", "data_dir", "download", "val_fraction", "seed", "train_limit", "val_limit", "test_limit")
_SEARCH_KEYS = ("trials", "sampler", "population", "startup_trials", "seed", "prune_below")
_POLICY_KEYS = ("name", "max_drop", "fallback", "calibration")
CALIBRATIONS = ("fit", "nachos")
GRID_POLICIES = ("cumulative", "gate", "max_prob", "margin")  # NACHOS' ε grid: scores in [0, 1], higher fires
# The proxy budget's defaults: short, quiet, on the CPU unless told otherwise.
_TRAIN_DEFAULTS = {"epochs": 2, "batch_size": 64, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 5e-4,
                   "schedule": "onecycle", "progress": False}


def _section(raw: Mapping, key: str, allowed: tuple[str, ...] | None) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
    if allowed is not None:
        bad = set(value) - set(allowed)
        if bad:
            raise ConfigError(f"{key}: unknown key(s) {', '.join(sorted(map(str, bad)))}; allowed: {', '.join(allowed)}")
    return dict(value)


def _number(section: str, key: str, value: Any, *, low: float | None = None, high: float | None = None,
            integer: bool = False, open_low: bool = False) -> Any:
    ok_type = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
    if not ok_type or (not integer and not math.isfinite(value)):
        raise ConfigError(f"{section}.{key}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    if low is not None and (value <= low if open_low else value < low):
        raise ConfigError(f"{section}.{key}: must be {'>' if open_low else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{section}.{key}: must be <= {high}, got {value!r}")
    return value


@dataclass
class SearchConfig:
    """A checked search configuration; :meth:`from_dict` builds it, :meth:`to_dict` gives it back."""

    name: str
    dataset: dict[str, Any]
    space: SearchSpace
    space_dict: dict[str, Any]
    accuracy_floor: float
    macs_ceiling: float
    objective: str = "joint"
    objective_options: dict[str, Any] = field(default_factory=dict)
    policy: str = "max_prob"
    max_drop: float = 0.01
    fallback: str = "final"
    calibration: str = "fit"  # fit: eenn's calibrator to max_drop; nachos: NACHOS' ε grid (best val accuracy)
    train: dict[str, Any] = field(default_factory=dict)
    retrain: dict[str, Any] = field(default_factory=dict)
    trials: int = 16
    sampler: str = "nsga2"
    population: int = 8
    startup_trials: int = 6
    seed: int = 0
    prune_below: float | None = None  # after the first epoch: best exit's val accuracy below this -> pruned

    # -------------------------------------------------------------------------- parsing
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "SearchConfig":
        if not isinstance(raw, Mapping) or not raw:
            raise ConfigError("the search config is empty; see configs/search_digits.yaml for a complete example")
        bad = set(raw) - set(_SECTIONS)
        if bad:
            raise ConfigError(f"unknown top-level key(s) {', '.join(sorted(map(str, bad)))}; allowed: {', '.join(_SECTIONS)}")
        if "space" not in raw:
            raise ConfigError("space: missing; declare the search space (family, stages, exits, head)")
        if raw["space"] is not None and not isinstance(raw["space"], Mapping):
            raise ConfigError(f"space: expected a mapping such as {{family: resnet, stages: [...]}}, got "
                              f"{type(raw['space']).__name__} {raw['space']!r}"[:200])
        space_dict = copy.deepcopy(dict(raw["space"] or {}))
        space = SearchSpace.from_dict(space_dict)

        ds = _section(raw, "dataset", _DATASET_KEYS)
        ds.setdefault("name", "digits")
        ds.setdefault("val_fraction", 0.2)
        ds.setdefault("seed", 0)
        if not isinstance(ds["name"], str):
            raise ConfigError(f"dataset.name: expected a data set name (eenn list datasets), got {ds['name']!r}")
        _number("dataset", "val_fraction", ds["val_fraction"], low=0, high=1, open_low=True)
        for k in ("train_limit", "val_limit", "test_limit"):
            if ds.get(k) is not None:
                _number("dataset", k, ds[k], low=1, integer=True)

        cons = _section(raw, "constraints", ("accuracy_floor", "macs_ceiling"))
        if "accuracy_floor" not in cons or "macs_ceiling" not in cons:
            raise ConfigError("constraints: give both accuracy_floor (a fraction in [0, 1], e.g. 0.9) and macs_ceiling "
                              "(expected MACs per sample, e.g. 150000)")
        floor = _number("constraints", "accuracy_floor", cons["accuracy_floor"], low=0, high=1)
        if floor > 1 or floor < 0:
            raise ConfigError("constraints.accuracy_floor: a fraction in [0, 1] (0.9, not 90)")
        ceiling = _number("constraints", "macs_ceiling", cons["macs_ceiling"], low=0, open_low=True)

        obj = _section(raw, "objective", ("name", "options"))
        objective = obj.get("name", "joint")
        from ..objectives import list_objectives

        if objective not in list_objectives():
            raise ConfigError(f"objective.name: unknown objective {objective!r}; choose one of {', '.join(list_objectives())}")
        objective_options = dict(obj.get("options") or {})
        from ..objectives.base import check_objective

        try:  # the options' names and types now, not in the first trial (nachos' mmax comes from the ceiling)
            check_objective(objective, {**({"mmax": 1.0} if objective == "nachos" else {}), **objective_options})
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"objective: {e.args[0] if e.args else e}") from None

        pol = _section(raw, "policy", _POLICY_KEYS)

        policy = pol.get("name", "max_prob")
        if policy not in list_policies() or policy == "ensemble":
            raise ConfigError(f"policy.name: {policy!r} is not usable here; choose one of "
                              f"{', '.join(p for p in list_policies() if p != 'ensemble')}")
        max_drop = _number("policy", "max_drop", pol.get("max_drop", 0.01), low=0, high=1)
        fallback = pol.get("fallback", "final")
        try:
            ExitPolicy(policy, fallback=fallback)
        except ValueError as e:
            raise ConfigError(f"policy: {e}") from None
        calibration = pol.get("calibration", "fit")
        if calibration not in CALIBRATIONS:
            raise ConfigError(f"policy.calibration: {calibration!r}; choose fit (eenn's calibrator, to max_drop) or "
                              "nachos (NACHOS' ε grid)")
        if calibration == "nachos" and policy not in GRID_POLICIES:
            raise ConfigError(f"policy.calibration: nachos sets thresholds in [0, 1] for {', '.join(GRID_POLICIES)}; "
                              f"not for {policy!r} (use calibration: fit)")

        from ..trainer import TrainConfig

        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        train = _section(raw, "train", tuple(sorted(fields)))
        retrain = _section(raw, "retrain", tuple(sorted(fields)))
        for key in ("out_dir", "resume"):
            if key in train:
                raise ConfigError(f"train.{key}: set by the search itself (candidates are not checkpointed); remove it")
        train = {**_TRAIN_DEFAULTS, **train}
        try:
            TrainConfig(**train).validate()
            TrainConfig(**{**train, **retrain}).validate()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"train/retrain: {e}") from None

        se = _section(raw, "search", _SEARCH_KEYS)
        trials = _number("search", "trials", se.get("trials", 16), low=1, integer=True)
        sampler = se.get("sampler", "nsga2")
        if sampler not in SAMPLERS:
            raise ConfigError(f"search.sampler: unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        population = _number("search", "population", se.get("population", 8), low=2, integer=True)
        startup = _number("search", "startup_trials", se.get("startup_trials", 6), low=1, integer=True)
        seed = _number("search", "seed", se.get("seed", 0), low=0, integer=True)
        prune_below = se.get("prune_below")
        if prune_below is not None:
            _number("search", "prune_below", prune_below, low=0, high=1)
        name = raw.get("name") or f"{ds['name']}-{space.family}"
        if not isinstance(name, str):
            raise ConfigError(f"name: expected a string (the default study name), got {name!r}")
        if objective == "nachos":
            objective_options.setdefault("mmax", float(ceiling))
        return cls(name=name, dataset=ds, space=space, space_dict=space_dict, accuracy_floor=float(floor),
                   macs_ceiling=float(ceiling), objective=objective, objective_options=objective_options,
                   policy=policy, max_drop=float(max_drop), fallback=fallback, calibration=calibration,
                   train=train, retrain=retrain,
                   trials=trials, sampler=sampler, population=population, startup_trials=startup, seed=seed,
                   prune_below=None if prune_below is None else float(prune_below))

    @property
    def gated(self) -> bool:
        """Whether the heads must emit a gate (objectives and policies that read one)."""
        return self.objective in ("nachos", "branching", "eenets") or self.policy in ("gate", "cumulative")

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain mapping (YAML/JSON-able); ``from_dict`` reads it back."""
        return {
            "name": self.name,
            "dataset": dict(self.dataset),
            "space": copy.deepcopy(self.space_dict),
            "constraints": {"accuracy_floor": self.accuracy_floor, "macs_ceiling": self.macs_ceiling},
            "objective": {"name": self.objective, "options": dict(self.objective_options)},
            "policy": {"name": self.policy, "max_drop": self.max_drop, "fallback": self.fallback,
                       "calibration": self.calibration},
            "train": dict(self.train),
            "retrain": dict(self.retrain),
            "search": {"trials": self.trials, "sampler": self.sampler, "population": self.population,
                       "startup_trials": self.startup_trials, "seed": self.seed, "prune_below": self.prune_below},
        }

    def replace(self, **changes: Any) -> "SearchConfig":
        """A copy with some settings changed and checked again (``accuracy_floor=``, ``trials=``...)."""
        raw = self.to_dict()
        where = {"accuracy_floor": "constraints", "macs_ceiling": "constraints", "trials": "search",
                 "sampler": "search", "population": "search", "seed": "search", "prune_below": "search",
                 "startup_trials": "search"}
        for k, v in changes.items():
            if k == "name":
                raw["name"] = v
            elif k in where:
                raw[where[k]][k] = v
            else:
                raise ConfigError(f"cannot replace {k!r}; edit the config file instead")
        if "macs_ceiling" in changes and self.objective == "nachos":
            raw["objective"]["options"]["mmax"] = float(changes["macs_ceiling"])
        return SearchConfig.from_dict(raw)


def load_config(path: str | Path) -> SearchConfig:
    """Read a YAML (or JSON) search configuration file."""
    from ..config import read_yaml

    return SearchConfig.from_dict(read_yaml(path))
