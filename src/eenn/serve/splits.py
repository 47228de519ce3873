"""Split planning: where to cut an exported model's segments between tiers.

:func:`plan_splits` chooses the split points that minimise the expected end-to-end latency
(:func:`expected_latency`) from each segment's time on each tier (MACs / declared MAC/s plus a
per-segment overhead, or times measured on that tier), the link costs, and the validation
distribution of how deep samples run (the exported manifest's ``validation.depth_distribution``).
A sample that runs to segment ``d`` costs every segment up to ``d`` on the tier that holds it,
plus, for every link it crosses, ``2 * latency`` (the request goes on, the answer comes back) and
the hand-off bytes over the bandwidth.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

from .plan import LinkSpec

__all__ = ["TierSpeed", "PlanResult", "handoff_bytes", "expected_latency", "plan_splits", "measure_segments"]


@dataclass
class TierSpeed:
    """How fast a tier runs segments: ``macs_per_s`` and a fixed ``overhead_s`` per segment run
    (call and policy overhead, which dominate small models), or ``segment_s`` measured there
    (:func:`measure_segments`); plus ``answer_s`` once for the sample that exits there.
    ``batch_s``, measured at ``batch`` samples per run, lets :meth:`run_time` tell the fixed
    cost of a run from the cost per sample (what batching saves)."""

    name: str
    macs_per_s: float | None = None
    overhead_s: float = 0.0
    segment_s: Sequence[float] | None = None
    answer_s: float = 0.0  # the cost of answering a sample that exits on this tier
    batch_s: Sequence[float] | None = None  # seconds per segment run of `batch` samples
    batch: int = 1

    def time(self, k: int, macs: int) -> float:
        if self.segment_s is not None:
            return float(self.segment_s[k])
        if not self.macs_per_s:
            raise ValueError(f"tier {self.name!r} needs macs_per_s or segment_s")
        return self.overhead_s + macs / self.macs_per_s

    def run_cost(self, k: int, macs: int) -> tuple[float, float]:
        """``(fixed seconds per run, seconds per sample)`` of segment ``k``: from the times
        measured at batch 1 and at ``batch`` (a straight line through both), else from the
        declared speed (``overhead_s`` per run, MACs / ``macs_per_s`` per sample); measured at
        batch 1 only, every sample costs the batch-1 time (no saving assumed)."""
        if self.segment_s is not None:
            t1 = float(self.segment_s[k])
            if self.batch_s is None or self.batch <= 1:
                return 0.0, t1
            per = max((float(self.batch_s[k]) - t1) / (self.batch - 1), 0.0)
            return max(t1 - per, 0.0), per
        if not self.macs_per_s:
            raise ValueError(f"tier {self.name!r} needs macs_per_s or segment_s")
        return self.overhead_s, macs / self.macs_per_s


@dataclass
class PlanResult:
    bounds: list[tuple[int, int]]  # per tier [start, stop); empty tiers have start == stop
    predicted_s: float  # expected end-to-end latency (batch 1)
    per_depth_s: list[float]  # latency of a sample that runs to each segment
    ranking: list[tuple[float, list[tuple[int, int]]]]  # the best candidates, best first

    def to_plan(self, model: str, names: Sequence[str], **options) -> dict[str, Any]:
        """A plan dict for :meth:`TierPlan.from_dict` (empty tiers left out)."""
        tiers = [{"name": n, "segments": f"{a}-{b - 1}"} for n, (a, b) in zip(names, self.bounds) if b > a]
        return {"model": model, "tiers": tiers, **options}


def handoff_bytes(manifest: dict[str, Any], done: int, *, float16: bool = False) -> int:
    """Bytes of the hand-off message for one sample after ``done`` segments (``done = 0``: the
    raw input). Features plus every exit's logits so far (and gates), plus the header."""
    import numpy as np

    from .codec import encode

    C = manifest["num_classes"]
    if done == 0:
        state = [np.zeros((1, *manifest["input_shape"]), np.float32)]
    else:
        seg = manifest["segments"][done - 1]
        state = [np.zeros([1, *o["shape"][1:]], np.float32) for o in seg["outputs"][: seg["num_state_outputs"]]]
    arrays = {f"state_{i}": s for i, s in enumerate(state)}
    arrays["index"] = np.zeros(1, np.int64)
    arrays["logits"] = np.zeros((done, 1, C), np.float32)
    if manifest["has_gates"]:
        arrays["gates"] = np.zeros((done, 1), np.float32)
    half = [k for k in arrays if k.startswith("state_")] if done else []
    return len(encode(arrays, {"next_segment": done, "batch": 1}, float16=float16, half=half))


def expected_latency(manifest: dict[str, Any], bounds: Sequence[tuple[int, int]], speeds: Sequence[TierSpeed],
                     links: Sequence[LinkSpec], depth: Sequence[float], *, float16: bool = False,
                     sizes: Sequence[int] | None = None) -> tuple[float, list[float]]:
    """``(expected seconds, seconds per depth)`` of batch-1 requests under ``bounds``."""
    E = manifest["num_exits"]
    macs = [s["macs"] for s in manifest["segments"]]
    sizes = sizes or [handoff_bytes(manifest, b, float16=float16) for b in range(E)]
    tier_of = [next(t for t, (a, b) in enumerate(bounds) if a <= k < b) for k in range(E)]
    per_depth, t_compute = [], 0.0
    for d in range(E):
        t_compute += speeds[tier_of[d]].time(d, macs[d])
        hops = sum(2 * links[i].latency_s + sizes[bounds[i][1]] / links[i].bandwidth for i in range(tier_of[d]))
        per_depth.append(t_compute + speeds[tier_of[d]].answer_s + hops)
    total = sum(p * t for p, t in zip(depth, per_depth)) / max(sum(depth), 1e-12)
    return total, per_depth


def plan_splits(manifest: dict[str, Any], speeds: Sequence[TierSpeed], links: Sequence[LinkSpec],
                depth: Sequence[float] | None = None, *, float16: bool = False, allow_empty: bool = True,
                keep: int = 5) -> PlanResult:
    """The split of the segments over the tiers (in order) with the lowest expected latency.

    ``depth``: the share of samples that run to each segment (default: the manifest's
    validation ``depth_distribution``). With ``allow_empty`` a tier may take no segment (the
    features are relayed through it, paying its links)."""
    E, T = manifest["num_exits"], len(speeds)
    if len(links) != T - 1:
        raise ValueError(f"{T} tiers need {T - 1} links, got {len(links)}")
    if depth is None:
        val = manifest.get("validation") or {}
        depth = val.get("depth_distribution")
        if depth is None:
            raise ValueError("no depth distribution: the export has no validation record (eenn export --dataset or "
                             "--calibration; eenn.export(..., validation=...)), so pass depth=")
    if len(depth) != E:
        raise ValueError(f"depth distribution has {len(depth)} entries for {E} segments")
    sizes = [handoff_bytes(manifest, b, float16=float16) for b in range(E)]
    results = []
    # cut points c_1 <= ... <= c_{T-1} in 0..E: tier t holds segments [c_t, c_{t+1})
    for cuts in itertools.combinations_with_replacement(range(E + 1), T - 1):
        edges = [0, *cuts, E]
        bounds = [(edges[t], edges[t + 1]) for t in range(T)]
        if not allow_empty and any(a == b for a, b in bounds):
            continue
        if bounds[-1][0] == E and not allow_empty:
            continue
        total, per = expected_latency(manifest, bounds, speeds, links, depth, sizes=sizes)
        results.append((total, bounds, per))
    if not results:
        raise ValueError(f"no split of {E} segments over {T} tiers without empty tiers")
    results.sort(key=lambda r: (r[0], r[1]))
    best = results[0]
    return PlanResult(best[1], best[0], best[2], [(r[0], r[1]) for r in results[:keep]])


def measure_segments(manifest: dict[str, Any], *, repeats: int = 50, threads: int = 1,
                     batch: int = 1) -> tuple[list[float], float]:
    """``(seconds per segment, seconds to answer)`` at ``batch`` samples per run (1: the latency
    case) on this machine, through the runner
    the tiers use: each segment run with nobody exiting (onnxruntime call plus the policy's
    decision), and the extra cost when the sample exits (its answer: probabilities, prediction).
    The segments are timed in turn, as a request meets them, not each in a hot loop. Medians."""
    import statistics
    import time

    import numpy as np

    from ..policies import ExitPolicy
    from ..staged import StagedRunner

    E = manifest["num_exits"]
    never = float("-inf") if ExitPolicy.from_dict(manifest["policy"]).name == "entropy" else float("inf")  # nobody exits
    always = -never
    runners = [StagedRunner(manifest, segments=(k, k + 1), threads=threads, thresholds=never) for k in range(E)]
    exiting = StagedRunner(manifest, segments=(0, 1), threads=threads, thresholds=always)
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    x = np.random.default_rng(0).standard_normal((batch, *manifest["input_shape"])).astype(np.float32)
    carries = [runners[0].start(x)]
    for k in range(E - 1):  # the input each segment sees
        _, c = runners[k].advance(carries[-1])
        carries.append(c)
    times: list[list[float]] = [[] for _ in range(E + 1)]
    for _ in range(repeats):
        for k in range(E):
            t0 = time.perf_counter()
            runners[k].advance(carries[k])
            times[k].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        exiting.advance(carries[0])
        times[E].append(time.perf_counter() - t0)
    med = [statistics.median(t) for t in times]
    return med[:E], max(med[E] - med[0], 0.0)
