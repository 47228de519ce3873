"""Run configuration: YAML files and command-line overrides validated into dataclasses.

A run is described by one :class:`RunConfig` with five sections::

    data:      {name: fashion_mnist, limit: 20000, val_fraction: 0.1}
    model:     {backbone: resnet20, exits: linear:3, head: linear, backbone_options: {width: 0.5}}
    objective: {name: joint, options: {weights: sdn}}
    train:     {epochs: 10, lr: 0.05, out_dir: runs/r20}        # eenn.trainer.TrainConfig
    eval:      {policy: max_prob, goal: {max_drop: 0.01}}        # the report after training

:func:`load_config` reads a YAML file (unknown keys and wrong types are refused with the key's
dotted name), applies ``key=value`` overrides (``train.epochs=3``; values in YAML syntax), and
returns the validated config. :func:`save_config` writes the resolved config back as YAML.
A ``compare`` file adds ``methods: {label: {section: {...}}}``, each merged over the base.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .io import dump_yaml, yaml_error, yaml_load
from .trainer import TrainConfig

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "ObjectiveConfig", "EvalConfig", "RunConfig",
           "load_config", "save_config", "check_config", "config_from_dict", "config_to_dict", "apply_overrides",
           "merge", "parse_exits"]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and says what to do."""


@dataclass
class DataConfig:
    name: str = "digits"
    data_dir: str | None = None
    download: bool = False
    val_fraction: float = 0.1
    limit: int | None = None  # cap every split at this many samples (stratified)


@dataclass
class ModelConfig:
    backbone: str = "resnet20"
    backbone_options: dict = field(default_factory=dict)  # e.g. {width: 0.5}
    exits: str | list | int = "all"  # "all", "none", [1, 3] or "1,3", "linear:3", stage names ("block2.0,block3.0")
    head: str | list | None = None  # one head for every exit, or one per exit; None: the backbone's default
    head_options: dict | list = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head is None:  # linear, or the family's own (msdnet): a stored config names it
            from .backbones import default_head

            self.head = default_head(self.backbone)


@dataclass
class ObjectiveConfig:
    name: str = "joint"
    options: dict = field(default_factory=dict)


@dataclass
class EvalConfig:
    policy: str = "max_prob"
    goal: dict = field(default_factory=lambda: {"max_drop": 0.01})  # max_drop | budget | msdnet_q (+ alpha)
    fallback: str = "final"  # or "most_confident" (SDN)
    split: str = "test"
    batch_sizes: list = field(default_factory=lambda: [1, 256])
    timing_samples: list | None = None  # per batch size (or one for all); None: max(256, 8 x the batch size)
    repeats: int = 5
    curve_points: int = 12
    policy_options: dict = field(default_factory=dict)
    deployments: str = "all"  # the paths timed: "all" this machine offers (PyTorch, onnxruntime) or "eager"


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    meta: dict = field(default_factory=dict)  # free-form provenance (e.g. the search trial of a design); not used


# --- validation -----------------------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _check(value: Any, tp, key: str) -> Any:
    """``value`` as type ``tp`` (ints accepted for floats), or a ConfigError naming ``key``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for t in options:
            if t is type(None):
                continue
            try:
                return _check(value, t, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(t) for t in options)}, got {value!r}")
    base = origin or tp
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if isinstance(value, base):
        return copy.deepcopy(value)
    raise ConfigError(f"{key}: expected {_type_name(base)}, got {type(value).__name__} {value!r}")


def _build(cls, values: Mapping, prefix: str, dropped: list | None = None):
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            if dropped is not None:  # a stored config from an eenn that had this setting
                dropped.append(dotted)
                continue
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {dotted!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted + ".", dropped)
        else:
            kwargs[key] = _check(value, tp, dotted)
    return cls(**kwargs)


def config_from_dict(values: Mapping, *, dropped: list | None = None) -> RunConfig:
    """A validated :class:`RunConfig` from nested dicts (missing keys take their defaults).
    ``dropped``: for a config stored by an earlier eenn, a list that collects the keys this one
    no longer has (skipped) instead of refusing them."""
    return _build(RunConfig, values, "", dropped)


def parse_exits(value: Any) -> str | list:
    """Where the exits go, read the same from ``--exits``, ``--set model.exits=`` and YAML:
    ``all``, ``none`` and ``<distribution>:<number>`` (``linear:3``) as they are; a stage index
    (``3``), or a comma-separated text or list of stages, each an index or a stage name (``1,3``,
    ``block2.0,block3.0``, ``[1, 3]``) -> a list. What is wrong in the form is a ConfigError;
    whether a stage exists is known once the network is built."""
    from .placement import EXIT_DISTRIBUTIONS

    how = ("use all, none, <distribution>:<number of exits> (e.g. linear:3), or stages by index or name, "
           "e.g. 1,3 or block2.0,block3.0")
    given = value
    if isinstance(value, str):
        text = value.strip()
        if text in ("all", "none"):
            return text
        if ":" in text:
            dist, _, k = text.partition(":")
            if dist.strip() not in EXIT_DISTRIBUTIONS or not k.strip().isdigit() or int(k) < 1:
                raise ConfigError(f"model.exits: {value!r} not understood: a placement by cost is "
                                  f"<distribution>:<number of exits> with a distribution of "
                                  f"{', '.join(EXIT_DISTRIBUTIONS)} and a number >= 1, e.g. linear:3")
            return f"{dist.strip()}:{int(k)}"
        value = [t.strip() for t in text.split(",")]
        if not text or not all(value):
            raise ConfigError(f"model.exits: {text!r} names no stage where one is expected; {how} (none for no exits)")
    elif isinstance(value, bool) or not isinstance(value, (int, list)):
        raise ConfigError(f"model.exits: {value!r} not understood; {how}")
    items = [value] if isinstance(value, int) else value
    out: list = []
    for s in items:
        if isinstance(s, str) and s.lstrip("-").isdigit():
            s = int(s)
        if isinstance(s, bool) or not isinstance(s, (int, str)) or s == "":
            raise ConfigError(f"model.exits: {s!r} in {given!r} is not a stage; {how}")
        out.append(s)
    if len(set(out)) != len(out):
        raise ConfigError(f"model.exits: {given!r} names a stage twice: each exit goes after a different stage")
    return out


def _check_data_name(name: str) -> None:
    """Refuse a data set name load_dataset would not know (in any of its spellings)."""
    from .data import list_datasets
    from .data.datasets import DATASETS, dataset_key

    if dataset_key(name) not in list_datasets():
        try:
            DATASETS.get(name)
        except KeyError as err:
            raise ConfigError(f"data.name: {err.args[0]}") from None


def check_config(config: RunConfig) -> RunConfig:
    """Refuse what the types let through but a run cannot use, before anything is trained or
    written: values out of range, an evaluation that would fail after training (the goal, the
    policy's options, the timing sizes, a validation split to calibrate on). Returns ``config``."""
    d, e = config.data, config.eval
    if not 0 < d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction: {d.val_fraction:g} must lie in (0, 1): the exits are calibrated on "
                          "the validation split (eval.goal); e.g. 0.1")
    if d.limit is not None and d.limit < 1:
        raise ConfigError(f"data.limit: expected a number of samples >= 1 (or null for all), got {d.limit}")
    try:
        config.train.validate()
    except ValueError as err:
        raise ConfigError(f"train: {err}") from None
    m = config.model
    m.exits = parse_exits(m.exits)
    from .backbones.base import check_backbone
    from .heads import check_head

    _check_data_name(d.name)
    heads = [m.head] if isinstance(m.head, str) else list(m.head)
    options = m.head_options if isinstance(m.head_options, list) else [m.head_options]
    per_exit = not isinstance(m.head, str) and isinstance(m.head_options, list) and len(heads) == len(options)
    try:
        check_backbone(m.backbone, m.backbone_options)
        for head, head_opts in zip(heads, options) if per_exit else [(h, o) for h in heads for o in options]:
            # "cascade" is the network's option for a head (ZTW), not the head builder's
            check_head(head, {k: v for k, v in dict(head_opts or {}).items() if k != "cascade"})
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"model: {err.args[0] if err.args else err}") from None
    opts = config.objective.options
    from .objectives.base import check_objective

    try:
        check_objective(config.objective.name, opts)
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"objective: {err.args[0] if err.args else err}") from None
    if config.objective.name in ("heads_only", "ztw_heads") and not opts.get("checkpoint"):
        raise ConfigError(f"objective {config.objective.name!r} trains the exits on a frozen backbone: give the "
                          "trained network's weights (objective.options.checkpoint, CLI: -O checkpoint=FILE), or "
                          "the backbone stays at its random start")
    if config.objective.name == "ztw_ensemble" and not opts.get("checkpoint"):
        raise ConfigError("objective 'ztw_ensemble' trains ZTW's ensemble on a frozen, trained network: give the "
                          "ztw_heads run's weights (objective.options.checkpoint, CLI: -O checkpoint=FILE, e.g. "
                          "runs/ztw-heads/best.safetensors), or the ensemble is fitted to a network at its random start")
    if config.objective.name == "ztw_ensemble" and "ensemble" in e.policy_options and e.policy != "ensemble":
        # the run's learned ensemble (eenn.run.with_ensemble) goes with ZTW's rule, max_prob over it;
        # another rule (entropy, say) reads the exits themselves
        if e.policy == "max_prob":
            e.policy = "ensemble"
        else:
            e.policy_options = {k: v for k, v in e.policy_options.items() if k != "ensemble"}
    from .policies import ExitPolicy
    from .policies.calibrate import _as_goal

    try:
        _as_goal(e.goal)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"eval.goal {e.goal!r}: {err}") from None
    try:
        policy = ExitPolicy(e.policy, fallback=e.fallback, **e.policy_options)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"eval.policy {e.policy!r} with options {e.policy_options!r}: "
                          f"{err.args[0] if err.args else err}") from None
    given = sum(k in e.policy_options for k in ("weights", "ensemble"))
    if policy.name == "ensemble" and given != 1 and not (given == 0 and config.objective.name == "ztw_ensemble"):
        raise ConfigError("eval.policy 'ensemble' needs eval.policy_options.weights: a fixed scheme (uniform or "
                          "linear) or one weight per exit, e.g. --set 'eval.policy_options={weights: linear}' "
                          "(a ztw_ensemble run uses its learned ensemble)")
    if e.split not in ("train", "val", "test"):
        raise ConfigError(f"eval.split: expected train, val or test, got {e.split!r}")
    if e.deployments not in ("all", "eager"):
        raise ConfigError(f"eval.deployments: expected all or eager, got {e.deployments!r}")
    for key, values in (("batch_sizes", e.batch_sizes), ("timing_samples", e.timing_samples or [1])):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise ConfigError(f"eval.{key}: expected a list of whole numbers >= 1 ([] skips timing), got {values!r}")
    if e.batch_sizes and e.timing_samples is not None and len(e.timing_samples) not in (1, len(e.batch_sizes)):
        raise ConfigError(f"eval.timing_samples {e.timing_samples}: give one count, or one per batch size "
                          f"({len(e.batch_sizes)} for {e.batch_sizes}), or leave it out (null: at least 256 samples "
                          "and 8 batches per size)")
    if e.repeats < 1 or e.curve_points < 2:
        raise ConfigError(f"eval.repeats must be >= 1 and eval.curve_points >= 2, got {e.repeats} and {e.curve_points}")
    return config


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def merge(base: Mapping, override: Mapping) -> dict:
    """``override`` merged into a copy of ``base``, recursively for nested mappings."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
    return out


def _parse_value(text: str) -> Any:
    try:
        return yaml_load(text) if text.strip() else ""
    except yaml_error():
        return text


def apply_overrides(values: Mapping, overrides: list[str] | None) -> dict:
    """Apply ``section.key=value`` overrides (values in YAML syntax: ``3``, ``0.1``, ``[1, 3]``,
    ``{width: 0.5}``, ``null``) to nested dicts."""
    out = copy.deepcopy(dict(values))
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"an override takes KEY=VALUE with a dotted key (e.g. train.epochs=3), got {item!r}")
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = _parse_value(text)
    return out


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file, or a ConfigError that names the file and the problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found")
    try:
        values = yaml_load(p.read_text()) or {}
    except yaml_error() as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{p}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (data, model, objective, train, eval)")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: Mapping | None = None) -> RunConfig:
    """``base`` (dicts), then the YAML file at ``path``, then ``overrides``, validated."""
    values = dict(base or {})
    if path is not None:
        file_values = read_yaml(path)
        file_values.pop("methods", None)  # compare files: handled by eenn.compare
        values = merge(values, file_values)
    values = apply_overrides(values, overrides)
    try:
        return check_config(config_from_dict(values))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def save_config(config: RunConfig, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(dump_yaml(config_to_dict(config)))
    return p
