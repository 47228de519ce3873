"""What the agreement monitor (:mod:`eenn.serve.monitor`) is told by a plan's ``monitor:``
section, checked when the plan is read; and the small pieces of a manifest it works from."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ..cost import CostTable
from ..policies import ExitPolicy, as_thresholds

__all__ = ["MonitorConfig", "cost_table_from_manifest", "thresholds_of"]


@dataclass
class MonitorConfig:
    """The ``monitor:`` section of a plan (see the module docstring for each key)."""

    shadow_fraction: float = 0.1
    window: int = 512
    max_drop: float = 0.01
    min_samples: int | None = None  # default: the window
    check_every: int | None = None  # default: a quarter of the window
    min_interval_s: float = 60.0
    tolerance: float | str = "auto"
    refit: bool = True  # False: watch and report only
    seed: int = 0
    max_pending: int | None = None  # shadow samples queued at most (more are dropped); default 4 windows
    history: int = 100  # changes kept in the log

    KEYS = ("shadow_fraction", "window", "max_drop", "min_samples", "check_every", "min_interval_s", "tolerance",
            "refit", "seed", "max_pending", "history")

    @classmethod
    def from_dict(cls, data: Any) -> "MonitorConfig":
        """Read and check a plan's ``monitor:`` section; a ValueError says what is wrong."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ValueError(f"plan `monitor:` must be a mapping of settings ({', '.join(cls.KEYS)}), got {data!r}")
        unknown = sorted(set(data) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"unknown monitor key(s) {', '.join(map(str, unknown))}; "
                             f"the keys are {', '.join(cls.KEYS)}")
        c = cls(**dict(data))
        c.check()
        return c

    def check(self) -> None:
        def number(name, lo, hi, lo_open=False, hi_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"monitor {name} must be a number, got {v!r}")
            if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
                span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
                raise ValueError(f"monitor {name} must lie in {span}, got {v!r}")

        def integer(name, lo, hi=None, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"monitor {name} must be a whole number, got {v!r}")
            if v < lo or (hi is not None and v > hi):
                most = f" and at most {hi}" if hi is not None else ""
                raise ValueError(f"monitor {name} must be at least {lo}{most}, got {v}")

        number("shadow_fraction", 0.0, 1.0, lo_open=True)
        integer("window", 8)
        number("max_drop", 0.0, 1.0, hi_open=True)
        integer("min_samples", 1, self.window, optional=True)
        integer("check_every", 1, optional=True)
        number("min_interval_s", 0.0, math.inf)
        if self.tolerance != "auto":
            if isinstance(self.tolerance, str):
                raise ValueError(f"monitor tolerance must be a number or 'auto', got {self.tolerance!r}")
            number("tolerance", 0.0, 1.0)
        if not isinstance(self.refit, bool):
            raise ValueError(f"monitor refit must be true or false, got {self.refit!r}")
        integer("seed", 0)
        integer("max_pending", 1, optional=True)
        integer("history", 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cost_table_from_manifest(manifest: Mapping[str, Any]) -> CostTable:
    """A :class:`~eenn.cost.CostTable` with what calibration needs (the dynamic MACs of leaving
    at each exit) from an export manifest; the parameter counts are not in it (zeros)."""
    segs = manifest["segments"]
    dyn = manifest.get("dynamic_macs") or [s["cumulative_macs"] for s in segs]
    dyn = tuple(int(v) for v in dyn)
    E = len(dyn)
    seg = tuple(int(s["macs"]) for s in segs)
    full = dyn[-1] or 1
    return CostTable(exit_names=tuple(manifest["exit_names"]), stage_index=tuple(range(E)), backbone_macs=seg,
                     head_macs=(0,) * E, macs=dyn, dynamic_macs=dyn, params=(0,) * E,
                     fraction=tuple(d / full for d in dyn), total_params=0)


def thresholds_of(policy: ExitPolicy, num_exits: int) -> list[float]:
    """A policy's thresholds, one per non-final exit (a single value expanded)."""
    return [float(v) for v in as_thresholds(policy.thresholds, num_exits).tolist()]
