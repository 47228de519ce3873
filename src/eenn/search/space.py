"""The search space, declared as data: which family of eenn's own backbones, what each stage group
may be (blocks, channels; expansion and kernel size for the MobileNet family), which groups may
carry an exit (at least one does), and the exit heads' type and width.

A value that is a list is a choice; a dict ``{low, high[, step]}`` is an integer range; anything
else is fixed. For example (YAML)::

    family: resnet
    stages:
      - {depth: [1, 2], channels: [8, 16]}
      - {depth: [1, 2], channels: [16, 32]}
      - {depth: 1, channels: [32, 64]}
    exits: [0, 1]          # groups whose last block may carry an exit (default: all but the last)
    head: {type: [linear, conv], width: [null, 32]}

A sampled point is a :class:`Design`: the keyword arguments of :func:`eenn.create_network`
(plus what it was sampled from), so a design is retrained from its own description.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..config import ConfigError  # one error type for every unusable config (the CLI exits 2 on it)

__all__ = ["ConfigError", "Design", "FAMILIES", "SearchSpace"]


# family -> (backbone name, keys allowed per stage, required per-stage keys, fixed backbone options allowed)
FAMILIES: dict[str, dict[str, Any]] = {
    "resnet": {"backbone": "resnet_cifar", "stage_keys": ("depth", "channels"), "required": ("depth", "channels"),
               "options": ("shortcut", "width")},
    "mobilenet": {"backbone": "mobilenetv2", "stage_keys": ("depth", "channels", "expansion", "kernel", "stride"),
                  "required": ("depth", "channels"), "options": ("stem_channels", "last_channels", "dropout", "width")},
}
GATED_HEADS = ("nachos", "branching", "eenets")
GATE_OPTION_HEADS = ("linear", "conv", "sdn")  # take gate=True


@dataclass
class Param:
    """One searched (or fixed) value."""

    name: str
    kind: str  # "fixed", "choice", "int"
    value: Any = None  # fixed
    choices: tuple = ()  # choice
    low: int = 0
    high: int = 0
    step: int = 1

    def sample(self, trial) -> Any:
        if self.kind == "fixed":
            return self.value
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        return trial.suggest_int(self.name, self.low, self.high, step=self.step)

    def values(self) -> list:
        if self.kind == "fixed":
            return [self.value]
        if self.kind == "choice":
            return list(self.choices)
        return list(range(self.low, self.high + 1, self.step))

    @property
    def searched(self) -> bool:
        return self.kind != "fixed" and len(self.values()) > 1


def _param(name: str, spec: Any, *, check: Callable[[Any], bool], what: str) -> Param:
    """Parse one value of the space: list = choice, {low, high[, step]} = int range, else fixed."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError(f"space: {name} is an empty list; give at least one value ({what})")
        for v in spec:
            if not check(v):
                raise ConfigError(f"space: {name} has {v!r}, which is not {what}")
        if len(set(map(repr, spec))) != len(spec):
            raise ConfigError(f"space: {name} lists a value twice: {list(spec)}")
        # Optuna stores categorical choices as JSON: None, bool, int, float and str only.
        return Param(name, "choice", choices=tuple(spec)) if len(spec) > 1 else Param(name, "fixed", value=spec[0])
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"low", "high", "step"}
        if unknown or not {"low", "high"} <= set(spec):
            raise ConfigError(f"space: {name} as a range takes low, high and optionally step; got keys {sorted(spec)}")
        low, high, step = spec["low"], spec["high"], spec.get("step", 1)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, step)) or step < 1 or high < low:
            raise ConfigError(f"space: {name} range needs integers low <= high and step >= 1; got {dict(spec)}")
        if not (check(low) and check(high)):
            raise ConfigError(f"space: {name} range {low}..{high} is not {what}")
        return Param(name, "int", low=low, high=high, step=step)
    if not check(spec):
        raise ConfigError(f"space: {name} is {spec!r}, which is not {what}")
    return Param(name, "fixed", value=spec)


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _odd_int(v: Any) -> bool:
    return _pos_int(v) and v % 2 == 1


def _width(v: Any) -> bool:
    return v is None or _pos_int(v)


@dataclass
class Design:
    """One point of the space: ``network`` holds :class:`eenn.NetworkConfig`'s fields."""

    params: dict[str, Any]  # the sampled values, by parameter name
    network: dict[str, Any] = field(default_factory=dict)

    def build(self):
        from ..network import NetworkConfig

        return NetworkConfig(**copy.deepcopy(self.network)).build()


class SearchSpace:
    """Built by :meth:`from_dict`; :meth:`sample` draws a :class:`Design` from an Optuna trial."""

    def __init__(self, family: str, stages: list[dict[str, Param]], exit_groups: list[int], max_exits: int | None,
                 head_type: Param, head_width: Param, head_options: dict[str, Any], options: dict[str, Any]) -> None:
        self.family, self.stages, self.exit_groups = family, stages, exit_groups
        self.max_exits, self.head_type, self.head_width = max_exits, head_type, head_width
        self.head_options, self.options = head_options, options
        self.backbone = FAMILIES[family]["backbone"]
        k = len(exit_groups) if max_exits is None else min(max_exits, len(exit_groups))
        # Every non-empty subset of the allowed groups, as one categorical parameter: "at least
        # one exit" then holds by construction, with no rejected samples.
        self.exit_sets = [",".join(map(str, c)) for r in range(1, k + 1) for c in itertools.combinations(exit_groups, r)]
        self.exit_param = Param("exits", "choice", choices=tuple(self.exit_sets)) if len(self.exit_sets) > 1 else \
            Param("exits", "fixed", value=self.exit_sets[0])

    # ------------------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "SearchSpace":
        """Parse a space; raises :class:`ConfigError` naming the offending key."""
        if not isinstance(spec, Mapping) or not spec:
            raise ConfigError("space: empty; give at least 'family' and 'stages' (see configs/search_digits.yaml)")
        unknown = set(spec) - {"family", "stages", "exits", "max_exits", "head", "options"}
        if unknown:
            raise ConfigError(f"space: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                              "allowed: family, stages, exits, max_exits, head, options")
        family = spec.get("family", "resnet")
        if family not in FAMILIES:
            raise ConfigError(f"space.family: unknown family {family!r}; choose {', '.join(FAMILIES)}")
        fam = FAMILIES[family]
        raw_stages = spec.get("stages")
        if not isinstance(raw_stages, list) or len(raw_stages) < 2:
            raise ConfigError("space.stages: need a list of at least two stage groups (an exit goes after a group "
                              "that is not the last), e.g. [{depth: [1, 2], channels: [8, 16]}, {depth: 1, channels: 32}]")
        stages = []
        checks = {"depth": (_pos_int, "a positive integer"), "channels": (_pos_int, "a positive integer"),
                  "expansion": (_pos_int, "a positive integer"), "kernel": (_odd_int, "an odd positive integer"),
                  "stride": (lambda v: v in (1, 2), "1 or 2")}
        for g, st in enumerate(raw_stages):
            if not isinstance(st, Mapping):
                raise ConfigError(f"space.stages[{g}]: expected a mapping such as {{depth: [1, 2], channels: [8, 16]}}, got {st!r}")
            bad = set(st) - set(fam["stage_keys"])
            if bad:
                raise ConfigError(f"space.stages[{g}]: unknown key(s) {', '.join(sorted(map(str, bad)))} for family "
                                  f"{family!r}; allowed: {', '.join(fam['stage_keys'])}")
            missing = [k for k in fam["required"] if k not in st]
            if missing:
                raise ConfigError(f"space.stages[{g}]: missing {', '.join(missing)}")
            stages.append({k: _param(f"stage{g}.{k}", v, check=checks[k][0], what=checks[k][1]) for k, v in st.items()})
        n = len(stages)
        exits = spec.get("exits", list(range(n - 1)))
        if not isinstance(exits, list) or not exits or not all(isinstance(e, int) and not isinstance(e, bool) for e in exits):
            raise ConfigError(f"space.exits: a non-empty list of stage-group indices 0..{n - 2}, got {exits!r}")
        if any(not 0 <= e < n - 1 for e in exits) or len(set(exits)) != len(exits):
            raise ConfigError(f"space.exits: groups must be distinct and in 0..{n - 2} (group {n - 1} ends in the final "
                              f"classifier), got {exits}")
        max_exits = spec.get("max_exits")
        if max_exits is not None and not _pos_int(max_exits):
            raise ConfigError(f"space.max_exits: a positive integer, got {max_exits!r}")
        head = spec.get("head", {}) or {}
        if not isinstance(head, Mapping):
            raise ConfigError(f"space.head: expected a mapping {{type: [...], width: [...]}}, got {head!r}")
        bad = set(head) - {"type", "width", "options"}
        if bad:
            raise ConfigError(f"space.head: unknown key(s) {', '.join(sorted(map(str, bad)))}; allowed: type, width, options")
        from ..heads import list_heads

        heads = list_heads()
        head_type = _param("head.type", head.get("type", "linear"), check=lambda v: v in heads,
                           what=f"a registered head ({', '.join(heads)})")
        head_width = _param("head.width", head.get("width", None), check=_width, what="a positive integer or null")
        head_options = dict(head.get("options") or {})
        options = dict(spec.get("options") or {})
        bad = set(options) - set(fam["options"])
        if bad:
            raise ConfigError(f"space.options: unknown key(s) {', '.join(sorted(bad))} for family {family!r}; "
                              f"allowed: {', '.join(fam['options'])}")
        space = cls(family, stages, sorted(exits), max_exits, head_type, head_width, head_options, options)
        if "eenets" in head_type.values() and head_width.searched:
            raise ConfigError("space.head: head 'eenets' has no width; search the width with other head types only")
        return space

    # ----------------------------------------------------------------------------- sampling
    @property
    def parameters(self) -> list[Param]:
        return [*(p for st in self.stages for p in st.values()), self.exit_param, self.head_type, self.head_width]

    def size(self) -> int:
        """How many distinct designs the space holds."""
        out = 1
        for p in self.parameters:
            out *= len(p.values())
        return out

    def sample(self, trial, *, num_classes: int, in_channels: int, input_size, gated: bool = False) -> Design:
        """Draw every parameter from ``trial`` (an Optuna trial, or anything with
        ``suggest_categorical`` / ``suggest_int``) and build the design's network config."""
        values = {p.name: p.sample(trial) for p in self.parameters}
        return self.design(values, num_classes=num_classes, in_channels=in_channels, input_size=input_size, gated=gated)

    def design(self, values: Mapping[str, Any], *, num_classes: int, in_channels: int, input_size,
               gated: bool = False) -> Design:
        """The design of given parameter values (every searched parameter named)."""
        vals = {p.name: (values[p.name] if p.name in values else p.value) for p in self.parameters}
        groups = [{k: vals[f"stage{g}.{k}"] for k in st} for g, st in enumerate(self.stages)]
        depths = [g["depth"] for g in groups]
        if self.family == "resnet":
            opts = {"depths": depths, "channels": [g["channels"] for g in groups], **self.options}
        else:
            rows = []
            for g, grp in enumerate(groups):
                stride = grp.get("stride", 1 if g == 0 else 2)
                rows.append([grp.get("expansion", 6), grp["channels"], grp["depth"], stride, grp.get("kernel", 3)])
            opts = {"settings": rows, **self.options}
        # An exit after group g sits on the group's last block (stage index = blocks so far - 1).
        ends = list(itertools.accumulate(depths))
        exit_groups = [int(e) for e in str(vals["exits"]).split(",")]
        head = vals["head.type"]
        head_opts = dict(self.head_options)
        if vals["head.width"] is not None and head != "eenets":
            head_opts["width"] = vals["head.width"]
        if gated and head in GATE_OPTION_HEADS:
            head_opts["gate"] = True
        network = {
            "backbone": self.backbone,
            "in_channels": int(in_channels),
            "num_classes": int(num_classes),
            "input_size": [int(s) for s in (input_size if isinstance(input_size, (list, tuple)) else (input_size,) * 2)],
            "backbone_options": opts,
            "exits": [ends[g] - 1 for g in exit_groups],
            "head": head,
            "head_options": head_opts,
        }
        return Design(dict(vals), network)

    def cheapest(self, **kw) -> list[Design]:
        """Designs that lower-bound the MACs any design can reach: every stage at its smallest
        values, an exit at the first allowed group, each head type at its smallest width (a
        ``null`` width, i.e. no hidden layer / the stage's channels, counted as well)."""
        base = {}
        for g, st in enumerate(self.stages):
            for k, p in st.items():
                vals = p.values()
                # stride 2 shrinks what follows: the cheaper choice
                base[f"stage{g}.{k}"] = max(vals) if k == "stride" else min(vals)
        base["exits"] = str(self.exit_groups[0])
        out = []
        for h in self.head_type.values():
            for w in self.head_width.values():
                out.append(self.design({**base, "head.type": h, "head.width": w}, **kw))
        return out
