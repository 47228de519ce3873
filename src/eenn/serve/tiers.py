"""One tier of a split deployment and the shape of an answer.

A :class:`Tier` holds a consecutive range of segments. It receives a hand-off message (the
features of the samples still running and what the exit policy remembers of them, see
:mod:`.codec` and :class:`eenn.policies.Running`), runs its segments through the exit loop
(:class:`eenn.staged.StagedRunner`), answers the samples that exit, and hands the rest on as
a new message. The transport between tiers is not its business: :class:`~.local.LocalPipeline`
chains tiers by queues in one process, :mod:`.ray_app` chains them through Ray Serve.

When the next tier fails or times out, the samples it should have taken are answered by the
deepest exit already computed and flagged ``degraded``; the reason goes into ``errors``.

Batching: a tier may run the samples of several concurrent requests at once
(:meth:`Tier.run_many`, through :func:`advance_many`, the one implementation of "merge the
requests, advance, split the answers and the survivors back"), then hands the survivors of the
whole run on as one message and splits the next tier's reply back per request; the next tier
batches again whatever arrives there. In-process a queue per tier (:mod:`.local`) gathers the
requests (at most the tier's ``max_batch`` samples, waiting at most ``batch_wait_ms`` after the
first); on Ray Serve, ``serve.batch`` does (:mod:`.ray_tiers`). Both keep the window open only
while it gathers something (:class:`BatchWindow`).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from ..policies.loop import Answers, Running, start
from ..staged import StagedRunner
from .codec import decode, encode
from .plan import TierSpec

__all__ = ["Tier", "BatchWindow", "advance_many", "merge_runnings", "split_reply", "start_message", "build_response"]

def start_message(manifest: dict[str, Any], x: np.ndarray, thresholds: list[float] | None = None) -> bytes:
    """The message the first tier receives: the model inputs, before segment 0. ``thresholds``
    (one per non-final exit): the policy's thresholds to serve this request with, which every tier
    adopts from the message (and hands on), so that thresholds refitted at the front reach every
    replica of every tier with the traffic (the agreement monitor on Ray)."""
    dtype = x.dtype if x.dtype.kind in "iu" else np.float32  # token ids stay integers
    arrays, meta = start((torch.from_numpy(np.ascontiguousarray(x, dtype)),)).to_arrays()
    if thresholds is not None:
        meta["thresholds"] = [float(t) for t in thresholds]
    return encode(arrays, meta)


_FIELDS = ("index", "prediction", "exit", "depth", "probs", "degraded")


def _answer_lists(a: Answers) -> dict[str, list]:
    """The answers as the lists of a reply: per sample its id, class, exit, depth, probabilities
    and ``degraded`` flag (:func:`_with_tier` adds the tier that answered)."""
    return {name: torch.cat(getattr(a, name)).tolist() if a.index else [] for name in _FIELDS}


def _with_tier(lists: dict[str, list], tier: str) -> dict[str, list]:
    return {**lists, "tier": [tier] * len(lists["index"])}


def _by_request(ids: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Sample ids of a merged run grouped by the request they belong to (requests start at
    ``starts``): ``(owner, order, cut)``, each id's request, the positions in request order, and
    request ``r``'s share of them, ``order[cut[r]:cut[r + 1]]``."""
    owner = np.searchsorted(starts, ids, side="right") - 1
    order = np.argsort(owner, kind="stable")
    return owner, order, np.searchsorted(owner[order], np.arange(len(starts) + 1)).tolist()


def _merge(into: dict[str, list], other: dict[str, list]) -> None:
    for k, v in other.items():
        into[k].extend(v)


def merge_runnings(runnings: list[Running]) -> tuple[Running, list[int]]:
    """The samples of several requests (each numbered from 0, before the same segment) as one
    :class:`Running`, each request's sample ids offset by the sizes of the requests before it;
    and those offsets."""
    offsets, at = [], 0
    for r in runnings:
        offsets.append(at)
        at += r.batch
    if len(runnings) == 1:
        return runnings[0], offsets
    return Running.cat([replace(r, index=r.index + off, batch=off + r.batch) for r, off in zip(runnings, offsets)]), offsets


class BatchWindow:
    """How long a tier's batch stays open for more requests after its first one: at most the
    plan's ``batch_wait_ms``, and with ``adaptive`` (the plan's ``adaptive_wait``, on by default)
    about as long as requests keep joining.

    A window exists to gather concurrent requests into one run; the part of it after the last
    arrival only delays the batch. So after each batch that did not fill ``max_batch`` (a full
    batch says nothing about the window), the window follows when its requests arrived: if the
    last came in the window's second half, arrivals were still coming and the window doubles (up
    to the plan's); otherwise it halves, but not below twice the span from the first arrival to
    the last, and closes (0: a batch runs as soon as it has a request, with whatever queued
    meanwhile) once it falls under a tenth of the plan's with nothing to hold it open. One client
    waiting for each answer then stops paying a window sized for many (after four batches); a
    few clients whose requests come within a millisecond of each other get a window of a few
    milliseconds; under load batches fill as the plan sized them. Requests that queued while an
    earlier batch ran open a closed window again, to twice the time they took to arrive.
    :meth:`observe` is called with every batch as it is taken; :attr:`wait_s` is the window for
    the next (docs/serving.md, "Batching windows that follow the arrivals")."""

    def __init__(self, wait_s: float, max_batch: int, adaptive: bool = True) -> None:
        self.full, self.max_batch, self.adaptive = float(wait_s), int(max_batch), bool(adaptive)
        self.wait_s = self.full

    def observe(self, arrivals: list[float], samples: int) -> bool:
        """Adapt to a batch just taken: its requests' arrival times (seconds, any clock) and its
        samples. True when that changed :attr:`wait_s`."""
        if not self.adaptive or self.full <= 0 or samples >= self.max_batch or not arrivals:
            return False
        before, w = self.wait_s, self.wait_s
        span = max(arrivals) - min(arrivals)
        if span >= w / 2:  # still arriving late in the window (or a closed window's queue): longer
            w = min(self.full, 2 * max(w, span))
        else:  # its second half gathered nothing: shorter, but long enough for what did arrive
            w = max(2 * span, w / 2 if w / 2 >= self.full / 10 else 0.0)
        self.wait_s = w
        return w != before


def take_upto(queue: deque, cap: int, size: Callable[[Any], int]) -> list:
    """Whole items from the left of ``queue`` while their ``size`` adds up to at most ``cap``, and
    at least one (an item larger than ``cap`` goes alone): how a tier's queue takes a batch and a
    Ray tier's outbox a hand-off."""
    out = [queue.popleft()]
    n = size(out[0])
    while queue and n + size(queue[0]) <= cap:
        out.append(queue.popleft())
        n += size(out[-1])
    return out


def split_reply(reply: dict[str, Any], offset: int, n: int, share: float = 1.0) -> dict[str, Any]:
    """One request's part of a reply to merged requests (:func:`merge_runnings`): the answers to
    its samples ``offset .. offset+n-1``, numbered from 0 again; the tier and hop records are the
    merged run's, their ``bytes`` scaled by ``share``."""
    a = reply["answers"]
    keep = [i for i, idx in enumerate(a["index"]) if offset <= idx < offset + n]
    answers = {k: [v[i] for i in keep] for k, v in a.items()}
    answers["index"] = [a["index"][i] - offset for i in keep]
    hops = [{**h, "bytes": int(round(h["bytes"] * share))} for h in reply["hops"]]
    return {"answers": answers, "tiers": [dict(t) for t in reply["tiers"]], "hops": hops,
            "errors": list(reply.get("errors", []))}


def advance_many(runner: StagedRunner, runnings: list[Running]) -> list[tuple[dict[str, list], Running | None]]:
    """Run the samples of several requests (each a :class:`Running` numbered from 0, before the
    same segment) through ``runner`` at once: one :meth:`~eenn.staged.StagedRunner.advance` of
    their concatenation, its sample ids made unique by offsetting each request's by the sizes of
    the requests before it; then every request gets its own answers (as lists, see
    :func:`_answer_lists`) and its own survivors back, numbered as it sent them
    (None when none of its samples is left). The split is done once for the whole run (one sort
    of the answers and of the survivors by request), not request by request: a run of 16
    single-sample requests would otherwise pay some 15 small tensor operations per request."""
    merged, offsets = merge_runnings(runnings)
    answers, carry = runner.advance(merged)
    n = len(runnings)
    if n == 1:
        return [(_answer_lists(answers), carry)]
    starts = np.asarray(offsets, np.int64)
    out: list[dict[str, list]] = [{k: [] for k in _FIELDS} for _ in range(n)]
    if answers.index:
        cols = {k: torch.cat(getattr(answers, k)).numpy() for k in _FIELDS}
        owner, order, cut = _by_request(cols["index"], starts)
        cols["index"] = cols["index"] - starts[owner]  # numbered from 0 again, per request
        for k, v in cols.items():
            lst = v[order].tolist()
            for r in range(n):
                if cut[r] < cut[r + 1]:
                    out[r][k] = lst[cut[r]:cut[r + 1]]
    rests: list[Running | None] = [None] * n
    if carry is not None:
        _, order, cut = _by_request(carry.index.numpy(), starts)
        for r, run in enumerate(runnings):
            if cut[r] < cut[r + 1]:
                mine = carry.take(torch.from_numpy(order[cut[r]:cut[r + 1]]))
                rests[r] = replace(mine, index=mine.index - offsets[r], batch=run.batch)
    return list(zip(out, rests))


class Tier:
    """Segments ``spec.start .. spec.stop-1`` of an exported model."""

    def __init__(self, manifest: dict[str, Any], spec: TierSpec, *, float16: bool = False, threads: int = 1,
                 models: dict[int, bytes] | None = None) -> None:
        self.manifest, self.spec, self.name, self.float16 = manifest, spec, spec.name, float16
        self.runner = StagedRunner(manifest, segments=(spec.start, spec.stop), threads=threads, models=models)
        self.last = spec.stop == manifest["num_exits"]
        self._carried: list[float] | None = None  # the thresholds messages last carried (start_message)

    def begin(self, message: bytes) -> tuple[dict[str, Any], Running | None]:
        """Run this tier's segments on a message: the reply so far and the samples to hand on."""
        return self.run_many([self.read(message)])[0]

    def read(self, message: bytes) -> Running:
        """The samples a hand-off message carries. Thresholds in the message (:func:`start_message`)
        become this tier's from its next run on, and its hand-offs carry them on."""
        arrays, meta = decode(message)
        carried = meta.get("thresholds")
        if carried is not None and carried != self._carried:
            self.runner.set_policy(self.runner.policy, carried)
            self._carried = carried
        return Running.from_arrays(arrays, meta)

    def run_many(self, runnings: list[Running], waits: list[float] | None = None
                 ) -> list[tuple[dict[str, Any], Running | None]]:
        """Run this tier's segments once on the samples of several requests (:func:`advance_many`):
        per request, the reply so far and its samples to hand on. ``waits``: the seconds each
        request waited for its batch. A reply's ``tiers`` entry gives the run's compute time
        ``s``, the request's ``samples``, the ``batch`` (samples run together) and ``wait_s``."""
        t0 = time.perf_counter()
        results = advance_many(self.runner, runnings)
        compute = time.perf_counter() - t0
        total = sum(len(r) for r in runnings)
        waits = waits or [0.0] * len(runnings)
        return [({"answers": _with_tier(answers, self.name),
                  "tiers": [{"name": self.name, "s": compute, "samples": len(r), "batch": total, "wait_s": w}],
                  "hops": [], "errors": []}, carry)
                for r, w, (answers, carry) in zip(runnings, waits, results)]

    def handoff(self, carry: Running) -> tuple[bytes, float]:
        """The message for the next tier and the seconds it took to encode."""
        t0 = time.perf_counter()
        arrays, meta = carry.to_arrays()
        if self._carried is not None:
            meta["thresholds"] = self._carried
        msg = encode(arrays, meta, float16=self.float16, half=[k for k in arrays if k.startswith("state_")])
        return msg, time.perf_counter() - t0

    def join(self, reply: dict[str, Any], down: dict[str, Any], round_trip_s: float, encode_s: float,
             nbytes: int) -> None:
        """Fold the next tier's reply in. The hop's time is the round trip less the time spent
        inside the tiers downstream (computing, or waiting for a batch to fill): moving and
        (de)coding features and answers."""
        inner = sum(t["s"] + t.get("wait_s", 0.0) for t in down["tiers"]) + sum(h["s"] for h in down["hops"])
        hop = {"from": self.name, "to": down["tiers"][0]["name"], "bytes": int(nbytes),
               "s": max(round_trip_s - inner, 0.0) + encode_s}
        _merge(reply["answers"], down["answers"])
        reply["tiers"] += down["tiers"]
        reply["hops"] = [*reply["hops"], hop, *down["hops"]]
        reply["errors"] += down.get("errors", [])

    def join_merged(self, parts: list[tuple[dict[str, Any], Running]], offsets: list[int], down: dict[str, Any],
                    round_trip_s: float, encode_s: float, nbytes: int) -> None:
        """Fold the next tier's reply to one message of several requests' survivors
        (:func:`merge_runnings` of ``parts``' carries, at ``offsets``) back into each request's
        reply; the hop's encoding time and bytes are shared by samples."""
        total = sum(len(c) for _, c in parts)
        for (reply, carry), off in zip(parts, offsets):
            share = len(carry) / total
            self.join(reply, split_reply(down, off, carry.batch, share), round_trip_s, encode_s * share, nbytes * share)

    def fail(self, reply: dict[str, Any], carry: Running, next_name: str, error: BaseException | str) -> None:
        """The next tier failed: answer the carried samples with this tier's deepest exit."""
        _merge(reply["answers"], _with_tier(_answer_lists(self.runner.degrade(carry)), self.name))
        why = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        reply["errors"].append(f"tier {next_name!r} unavailable ({why}); answered by exit "
                               f"{carry.next - 1} on tier {self.name!r}")


def build_response(manifest: dict[str, Any], reply: dict[str, Any], batch: int, total_s: float,
                   single: bool) -> dict[str, Any]:
    """The JSON answer of ``POST /predict`` from a chain's reply."""
    a = reply["answers"]
    if sorted(a["index"]) != list(range(batch)):
        raise RuntimeError(f"the tiers answered {len(a['index'])} of {batch} samples")
    order = np.argsort(np.asarray(a["index"]), kind="stable")
    names, classes = manifest["exit_names"], manifest.get("class_names")
    rows = []
    for i in order:
        c = int(a["prediction"][i])
        row = {"class": c, "probabilities": [round(float(p), 6) for p in a["probs"][i]],
               "exit": int(a["exit"][i]), "exit_name": names[int(a["exit"][i])], "depth": int(a["depth"][i]),
               "tier": a["tier"][i], "degraded": bool(a["degraded"][i])}
        if classes:
            row["label"] = classes[c]
        rows.append(row)
    timing = {"time_s": {t["name"]: t["s"] for t in reply["tiers"]},
              "wait_s": {t["name"]: t.get("wait_s", 0.0) for t in reply["tiers"]},
              "batch_samples": {t["name"]: t.get("batch", t.get("samples")) for t in reply["tiers"]},
              "hops": reply["hops"], "total_s": total_s, "errors": reply.get("errors", [])}
    if single:
        return {**rows[0], **timing}
    return {"predictions": rows, **timing}
