"""One tier of a split deployment, the in-process chain of tiers, and the shape of an answer.

A :class:`Tier` holds a consecutive range of segments. It receives a hand-off message (the
features of the samples still running and what the exit policy remembers of them, see
:mod:`.codec` and :class:`eenn.policies.Running`), runs its segments through the exit loop
(:class:`eenn.staged.StagedRunner`), answers the samples that exit, and hands the rest on as
a new message. The transport between tiers is not its business: :class:`LocalPipeline`
chains tiers by plain calls in one process, :mod:`.ray_app` chains them through Ray Serve.

When the next tier fails or times out, the samples it should have taken are answered by the
deepest exit already computed and flagged ``degraded``; the reason goes into ``errors``.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..policies.loop import Answers, Running, start
from ..staged import StagedRunner, load_manifest, read_segments
from .codec import decode, encode
from .plan import TierPlan, TierSpec

__all__ = ["Tier", "LocalPipeline", "start_message", "build_response"]

def start_message(manifest: dict[str, Any], x: np.ndarray) -> bytes:
    """The message the first tier receives: the model inputs, before segment 0."""
    arrays, meta = start((torch.from_numpy(np.ascontiguousarray(x, np.float32)),)).to_arrays()
    return encode(arrays, meta)


def _answers_json(a: Answers, tier: str) -> dict[str, list]:
    if not a.index:
        return {"index": [], "prediction": [], "exit": [], "depth": [], "probs": [], "degraded": [], "tier": []}
    out = {name: torch.cat(getattr(a, name)).tolist()
           for name in ("index", "prediction", "exit", "depth", "probs", "degraded")}
    out["tier"] = [tier] * len(out["index"])
    return out


def _merge(into: dict[str, list], other: dict[str, list]) -> None:
    for k, v in other.items():
        into[k].extend(v)


class Tier:
    """Segments ``spec.start .. spec.stop-1`` of an exported model."""

    def __init__(self, manifest: dict[str, Any], spec: TierSpec, *, float16: bool = False, threads: int = 1,
                 models: dict[int, bytes] | None = None) -> None:
        self.manifest, self.spec, self.name, self.float16 = manifest, spec, spec.name, float16
        self.runner = StagedRunner(manifest, segments=(spec.start, spec.stop), threads=threads, models=models)
        self.last = spec.stop == manifest["num_exits"]

    def begin(self, message: bytes) -> tuple[dict[str, Any], Running | None]:
        """Run this tier's segments on a message: the reply so far and the samples to hand on."""
        arrays, meta = decode(message)
        running = Running.from_arrays(arrays, meta)
        t0 = time.perf_counter()
        answers, carry = self.runner.advance(running)
        compute = time.perf_counter() - t0
        reply = {"answers": _answers_json(answers, self.name),
                 "tiers": [{"name": self.name, "s": compute, "samples": int(len(arrays["index"]))}],
                 "hops": [], "errors": []}
        return reply, carry

    def handoff(self, carry: Running) -> tuple[bytes, float]:
        """The message for the next tier and the seconds it took to encode."""
        t0 = time.perf_counter()
        arrays, meta = carry.to_arrays()
        msg = encode(arrays, meta, float16=self.float16, half=[k for k in arrays if k.startswith("state_")])
        return msg, time.perf_counter() - t0

    def join(self, reply: dict[str, Any], down: dict[str, Any], round_trip_s: float, encode_s: float,
             nbytes: int) -> None:
        """Fold the next tier's reply in. The hop's time is the round trip less the time spent
        inside the tiers downstream: moving and (de)coding features and answers, no compute."""
        inner = sum(t["s"] for t in down["tiers"]) + sum(h["s"] for h in down["hops"])
        hop = {"from": self.name, "to": down["tiers"][0]["name"], "bytes": int(nbytes),
               "s": max(round_trip_s - inner, 0.0) + encode_s}
        _merge(reply["answers"], down["answers"])
        reply["tiers"] += down["tiers"]
        reply["hops"] = [*reply["hops"], hop, *down["hops"]]
        reply["errors"] += down.get("errors", [])

    def fail(self, reply: dict[str, Any], carry: Running, next_name: str, error: BaseException | str) -> None:
        """The next tier failed: answer the carried samples with this tier's deepest exit."""
        _merge(reply["answers"], _answers_json(self.runner.degrade(carry), self.name))
        why = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        reply["errors"].append(f"tier {next_name!r} unavailable ({why}); answered by exit "
                               f"{carry.next - 1} on tier {self.name!r}")


class LocalPipeline:
    """Every tier of a plan in this process, chained by plain calls (the default for tests and
    small use): ``LocalPipeline(plan)(message) -> reply`` as the Ray chain answers."""

    def __init__(self, plan: TierPlan, manifest: dict[str, Any] | None = None) -> None:
        self.plan = plan
        self.manifest = manifest or load_manifest(plan.model)
        self.tiers = [Tier(self.manifest, s, float16=plan.float16, threads=plan.threads,
                           models=read_segments(self.manifest, (s.start, s.stop))) for s in plan.tiers]

    def __call__(self, message: bytes) -> dict[str, Any]:
        return self._from(0, message)

    def _from(self, i: int, message: bytes) -> dict[str, Any]:
        tier = self.tiers[i]
        reply, carry = tier.begin(message)
        if carry is None:
            return reply
        out, enc = tier.handoff(carry)
        t0 = time.perf_counter()
        try:
            down = self._from(i + 1, out)
        except Exception as e:  # a failing tier (tests inject one) degrades, as in the Ray chain
            tier.fail(reply, carry, self.tiers[i + 1].name, e)
            return reply
        tier.join(reply, down, time.perf_counter() - t0, enc, len(out))
        return reply


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
              "hops": reply["hops"], "total_s": total_s, "errors": reply.get("errors", [])}
    if single:
        return {**rows[0], **timing}
    return {"predictions": rows, **timing}
