"""Tier plans: which consecutive segments run on which tier, and how each tier batches and is placed.

A plan file (YAML or JSON; segment indices are exit indices, 0-based)::

    model: export/            # the directory `eenn export` wrote (relative to this file)
    float16: false            # features cross tiers as float16 (halves the bytes)
    timeout_s: 5              # per tier: how long a tier waits for the next one
    tiers:
      - {name: device, segments: "0-1", with_front: true}
      - {name: edge,   segments: "2", max_batch: 32, batch_wait_ms: 2}
      - {name: cloud,  segments: rest, replicas: 2, ray_actor_options: {num_cpus: 1}}
    links:                    # optional, for planning: one per pair of neighbouring tiers
      - {bandwidth: 2.5e6, latency_s: 0.010}    # bytes/s, one-way seconds
      - {bandwidth: 1.25e7, latency_s: 0.030}
    monitor:                  # optional, in-process serving only: hold the agreement with the final
      shadow_fraction: 0.1    # exit under drift (eenn.serve.monitor; every key is optional)
      window: 512
      max_drop: 0.01

The split itself (which segments go to which tier) is planned by :mod:`.splits`.

Per tier, optionally: ``max_batch`` (1) samples that the tier gathers from concurrent requests
into one run of its segments, waiting at most ``batch_wait_ms`` (0) after the first arrives (a
request larger than ``max_batch`` runs alone; 1: no batching, no wait), a window that
shortens to about as long as requests keep joining it, and closes while they come one at a
time (``adaptive_wait``, true; false: every batch waits ``batch_wait_ms`` unless it fills:
:class:`eenn.serve.tiers.BatchWindow`); on Ray Serve also
``replicas`` (1) and ``ray_actor_options`` (e.g. ``{num_cpus: 1, num_gpus: 0, resources: {edge:
0.01}}``), and for the first tier ``with_front`` (false): run it inside the HTTP front's replicas
(Ray Serve's ingress deployment, which then takes this tier's ``replicas`` and
``ray_actor_options``) instead of as a deployment of its own that the front calls; in-process
serving has no such call and ignores it. The plan-wide ``max_batch`` (256) is another thing: the most samples one request may carry.
:func:`eenn.serve.sizing.propose_serving` proposes those per-tier values from measured times.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TierSpec", "LinkSpec", "TierPlan"]


@dataclass
class TierSpec:
    name: str
    start: int  # first segment (inclusive)
    stop: int  # last segment + 1
    ray_actor_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"resources": {"edge": 0.01}}
    replicas: int = 1  # Ray Serve replicas of this tier
    max_batch: int = 1  # samples gathered from concurrent requests into one run (1: no batching)
    batch_wait_ms: float = 0.0  # the longest a first arrival waits for others to join its batch
    with_front: bool = False  # on Ray: run in the HTTP front's (the ingress's) replicas; the first tier only
    adaptive_wait: bool = True  # the window follows the arrivals, up to batch_wait_ms (tiers.BatchWindow)

    def threads(self, default: int = 1) -> int:
        """The onnxruntime threads each in-process replica of this tier runs with: the plan's
        ``threads``, or the CPUs a replica reserves (``ray_actor_options.num_cpus``, rounded) when
        that is more. A replica runs one batch at a time, and one thread cannot use more than one
        core: a tier given 1.6 cores as one replica would otherwise use one. (On Ray a replica
        keeps the plan's ``threads``: there the framework's own processes, the HTTP proxy and the
        ingress, need the spare CPU; with single-sample requests on 2 cores the early exit served
        181-194 requests/s with the extra thread against 205-243 without, docs/serving.md.)"""
        cpus = self.ray_actor_options.get("num_cpus") or 0
        return max(int(default), int(float(cpus) + 0.5))

    def __post_init__(self) -> None:
        _check_tier_options(self.name, {"replicas": self.replicas, "max_batch": self.max_batch,
                                        "batch_wait_ms": self.batch_wait_ms,
                                        "ray_actor_options": self.ray_actor_options})
        for key in ("with_front", "adaptive_wait"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"tier {self.name!r}: `{key}` must be true or false, got {getattr(self, key)!r}")


@dataclass
class LinkSpec:
    bandwidth: float  # bytes per second
    latency_s: float  # one way

    def __post_init__(self) -> None:
        if not _number(self.bandwidth) or not self.bandwidth > 0:
            raise ValueError(f"link `bandwidth` must be a number of bytes per second > 0, got {self.bandwidth!r}")
        if not _number(self.latency_s) or not 0 <= self.latency_s < float("inf"):
            raise ValueError(f"link `latency_s` must be a number of seconds >= 0, got {self.latency_s!r}")


@dataclass
class TierPlan:
    model: str
    tiers: list[TierSpec]
    links: list[LinkSpec] = field(default_factory=list)
    float16: bool = False
    timeout_s: float = 5.0
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch: int = 256
    threads: int = 1  # onnxruntime threads per tier
    monitor: Any = None  # a eenn.serve.monitor.MonitorConfig, or None: no agreement monitor

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, Path)) or not str(self.model):
            raise ValueError(f"plan `model` must be the export directory (a path), got {self.model!r}")
        if not isinstance(self.tiers, (list, tuple)) or not self.tiers:
            raise ValueError(f"plan `tiers` must list at least one tier, got {self.tiers!r}")
        if not isinstance(self.float16, bool):
            raise ValueError(f"plan `float16` must be true or false, got {self.float16!r}")
        t = self.timeout_s
        if not _number(t) or not 0 < t < float("inf"):
            raise ValueError(f"plan `timeout_s` must be a number of seconds > 0 (how long a tier waits for the next "
                             f"one), got {t!r}")
        for key, what in (("max_body_bytes", "the largest request body in bytes"),
                          ("max_batch", "the most samples one request may carry"),
                          ("threads", "onnxruntime threads per tier")):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"plan `{key}` must be an integer >= 1 ({what}), got {v!r}")
        if self.links and len(self.links) != len(self.tiers) - 1:
            raise ValueError(f"plan `links`: {len(self.tiers)} tiers need {len(self.tiers) - 1} links (one per pair of "
                             f"neighbouring tiers), got {len(self.links)}")
        for t in self.tiers[1:]:
            if t.with_front:
                raise ValueError(f"tier {t.name!r}: only the first tier can run `with_front` (in the HTTP front's "
                                 "replicas); the others are deployments of their own")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base_dir: str | Path | None = None,
                  num_exits: int | None = None) -> "TierPlan":
        """Parse a plan (see the module docstring); ``segments`` takes ``k``, ``"a-b"``
        (inclusive), ``[a, b, ...]`` (consecutive) or ``"rest"``."""
        from ..staged import load_manifest

        if not isinstance(data, dict):
            raise ValueError(f"a plan is a mapping with `model` (an export directory) and `tiers`, got "
                             f"{type(data).__name__} {data!r:.80}")
        data = dict(data)
        unknown = set(data) - PLAN_KEYS
        if unknown:
            raise ValueError(f"unknown plan keys: {', '.join(sorted(map(str, unknown)))} (a plan takes "
                             f"{', '.join(sorted(PLAN_KEYS))})")
        if "model" not in data or "tiers" not in data:
            raise ValueError("a plan needs `model` (an export directory) and `tiers`")
        if not isinstance(data["model"], (str, Path)) or not str(data["model"]):
            raise ValueError(f"plan `model` must be the export directory (a path), got {data['model']!r}")
        if not isinstance(data["tiers"], list) or not data["tiers"]:
            raise ValueError(f"plan `tiers` must list at least one tier ({{name: ..., segments: ...}}), "
                             f"got {data['tiers']!r}")
        model = Path(data["model"])
        if base_dir is not None and not model.is_absolute():
            model = Path(base_dir) / model
        if num_exits is None:
            num_exits = int(load_manifest(model)["num_exits"])
        tiers, at = [], 0
        for t in data["tiers"]:
            if not isinstance(t, dict) or "name" not in t or "segments" not in t:
                raise ValueError(f"each tier needs `name` and `segments`, got {t!r}")
            a, b = _segments(t["segments"], at, num_exits, t["name"])
            if a != at:
                raise ValueError(f"tier {t['name']!r} starts at segment {a} but the previous tier stops at {at - 1}: "
                                 "tiers take consecutive segments in order")
            unknown = set(t) - TIER_KEYS
            if unknown:
                raise ValueError(f"tier {t['name']!r}: unknown keys {', '.join(sorted(map(str, unknown)))} (a tier "
                                 f"takes {', '.join(sorted(TIER_KEYS))})")
            options = {k: t[k] for k in ("replicas", "max_batch", "batch_wait_ms", "with_front", "adaptive_wait") if k in t}
            actor = t.get("ray_actor_options") or {}
            tiers.append(TierSpec(str(t["name"]), a, b, dict(actor) if isinstance(actor, dict) else actor, **options))
            at = b
        if at != num_exits:
            raise ValueError(f"the tiers cover segments 0..{at - 1} of 0..{num_exits - 1}; the last tier "
                             "can say `segments: rest`")
        if len({t.name for t in tiers}) != len(tiers):
            raise ValueError("tier names must be distinct")
        links = data.get("links") or []
        if not isinstance(links, list):
            raise ValueError(f"plan `links` must list one {{bandwidth: BYTES_PER_S, latency_s: SECONDS}} per pair of "
                             f"neighbouring tiers, got {links!r}")
        links = [_link(i, l) for i, l in enumerate(links)]
        rest = {k: data[k] for k in ("float16", "timeout_s", "max_body_bytes", "max_batch", "threads") if k in data}
        monitor = None
        if "monitor" in data and data["monitor"] is not None:
            from .monitor_config import MonitorConfig

            monitor = MonitorConfig.from_dict(data["monitor"])
        return cls(str(model), tiers, links, **rest, monitor=monitor)

    @classmethod
    def load(cls, path: str | Path) -> "TierPlan":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no plan file {p}" + (" (a folder)" if p.is_dir() else ""))
        try:
            text = p.read_text()
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not a text file ({e})") from None
        if p.suffix in (".yaml", ".yml"):
            data = _read_yaml(text, p)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if data is None:
            raise ValueError(f"{p} is empty: a plan needs `model` (an export directory) and `tiers`")
        if not isinstance(data, dict):
            raise ValueError(f"{p}: a plan is a mapping with `model` (an export directory) and `tiers`, got "
                             f"{type(data).__name__} {data!r:.80}")
        return cls.from_dict(data, base_dir=p.parent)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.monitor is None:
            del d["monitor"]
        d["tiers"] = [{"name": t.name, "segments": f"{t.start}-{t.stop - 1}",
                       **{k: getattr(t, k) for k, default in _TIER_DEFAULTS.items() if getattr(t, k) != default}}
                      for t in self.tiers]
        return d


PLAN_KEYS = {"model", "tiers", "links", "float16", "timeout_s", "max_body_bytes", "max_batch", "threads", "monitor"}
TIER_KEYS = {"name", "segments", "replicas", "ray_actor_options", "max_batch", "batch_wait_ms", "with_front",
             "adaptive_wait"}
_TIER_DEFAULTS = {"replicas": 1, "max_batch": 1, "batch_wait_ms": 0.0, "ray_actor_options": {}, "with_front": False,
                  "adaptive_wait": True}
# what Ray Serve takes in a deployment's ray_actor_options
_ACTOR_KEYS = {"num_cpus", "num_gpus", "memory", "object_store_memory", "resources", "accelerator_type", "runtime_env"}


def _link(i: int, entry: Any) -> LinkSpec:
    """Entry ``i`` of a plan's ``links``."""
    if not isinstance(entry, dict) or set(entry) != {"bandwidth", "latency_s"}:
        raise ValueError(f"plan `links` entry {i} must be {{bandwidth: BYTES_PER_S, latency_s: SECONDS}}, "
                         f"got {entry!r}")
    try:
        return LinkSpec(entry["bandwidth"], entry["latency_s"])
    except ValueError as e:
        raise ValueError(f"plan `links` entry {i}: {e}") from None


def _read_yaml(text: str, path: Path) -> Any:
    """A YAML plan; ``1e6`` and ``2.5e-3`` read as numbers (plain YAML 1.1 wants ``1.0e+6``); a
    syntax error as one line: the file, where, and what."""
    import yaml

    from ..io import yaml_load

    try:
        return yaml_load(text)
    except yaml.MarkedYAMLError as e:
        mark, ctx = e.problem_mark or e.context_mark, e.context_mark
        what = e.problem or e.context or "cannot read it"
        if e.problem and e.context:
            what += f" ({e.context}" + (f" that begins at line {ctx.line + 1}, column {ctx.column + 1}" if ctx else "") + ")"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}: not valid YAML{where}: {what}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_tier_options(name: str, o: dict[str, Any]) -> None:
    """Refuse a tier's ``replicas``, ``max_batch``, ``batch_wait_ms`` and ``ray_actor_options``
    with a message that says what is wrong."""
    for key in ("replicas", "max_batch"):
        v = o[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"tier {name!r}: `{key}` must be an integer >= 1, got {v!r}")
    w = o["batch_wait_ms"]
    if not _number(w) or not w >= 0 or w == float("inf"):
        raise ValueError(f"tier {name!r}: `batch_wait_ms` must be a number of milliseconds >= 0, got {w!r}")
    ao = o["ray_actor_options"]
    if not isinstance(ao, dict):
        raise ValueError(f"tier {name!r}: `ray_actor_options` must be a mapping such as {{num_cpus: 1, num_gpus: 0}}, "
                         f"got {ao!r}")
    unknown = set(ao) - _ACTOR_KEYS
    if unknown:
        raise ValueError(f"tier {name!r}: unknown ray_actor_options {', '.join(sorted(map(str, unknown)))} (Ray "
                         f"Serve takes {', '.join(sorted(_ACTOR_KEYS))})")
    for key in ("num_cpus", "num_gpus", "memory", "object_store_memory"):
        if key in ao and (not _number(ao[key]) or ao[key] < 0):
            raise ValueError(f"tier {name!r}: ray_actor_options `{key}` must be a number >= 0, got {ao[key]!r}")
    res = ao.get("resources", {})
    if not isinstance(res, dict) or not all(isinstance(k, str) and _number(v) and v >= 0 for k, v in res.items()):
        raise ValueError(f"tier {name!r}: ray_actor_options `resources` must map resource names to amounts >= 0, "
                         f"got {res!r}")


def _segments(spec: Any, at: int, num_exits: int, name: str) -> tuple[int, int]:
    if spec == "rest":
        return at, num_exits
    pair = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", spec) if isinstance(spec, str) else None
    if isinstance(spec, int) and not isinstance(spec, bool):
        a = b = spec
    elif pair:
        a, b = int(pair[1]), int(pair[2] or pair[1])
    elif isinstance(spec, (list, tuple)) and spec and all(isinstance(s, int) for s in spec):
        if list(spec) != list(range(spec[0], spec[0] + len(spec))):
            raise ValueError(f"tier {name!r}: segments {list(spec)} are not consecutive")
        a, b = spec[0], spec[-1]
    else:
        raise ValueError(f"tier {name!r}: cannot read segments {spec!r} (use k, 'a-b', [a, b, ...] or 'rest')")
    if a > b:
        raise ValueError(f"tier {name!r}: segments {a}-{b} are reversed: write the first one first ({b}-{a})")
    if not 0 <= a <= b < num_exits:
        raise ValueError(f"tier {name!r}: segments {a}-{b} outside 0-{num_exits - 1}")
    return a, b + 1
