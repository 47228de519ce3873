"""Where a served request's CPU goes on Ray Serve: the cores each process uses per request, for the
deployments of ``benchmarks/serve_load.py`` (same network, thresholds and plans), and what a Ray
Serve call between two replicas costs.

Deployments (``--runs``, in that order, repeated ``--rounds`` times with the order reversed every
other round): ``noop`` (the do-nothing tier behind the same ingress, with the early-exit plan's
first tier's settings), ``three`` (the early exit in three tiers), ``one`` (the early-exit plan:
one tier, ``device``, holding every segment), ``whole`` (the static network as one tier), each with
its first tier in the ingress replicas as ``eenn plan`` proposes it, or, with
``-apart`` (``one-apart``, ``noop-apart``, ...), as a deployment of its own sized as ``eenn plan
--no-with-front`` proposes it. A suffix overrides a tier's replicas and CPUs: ``three[device=2x0.9]`` runs the device tier as two replicas
of 0.9 CPUs, ``one[device=1x1.8]`` the one tier as one replica. For each run, a closed loop of ``--clients`` clients sending requests of
``--samples`` samples for ``--seconds``, and the CPU time of every process in that window (from
``/proc``, user + system) divided by the requests answered, grouped by deployment (the ingress
replica, each tier's replicas, HAProxy, Ray's own processes)::

    OMP_NUM_THREADS=1 python benchmarks/serve_cpu.py --samples 1 --runs noop,one,three,whole
    OMP_NUM_THREADS=1 python benchmarks/serve_cpu.py --samples 1 --runs noop,one,noop-apart,one-apart
    OMP_NUM_THREADS=1 python benchmarks/serve_cpu.py --samples 32 --runs "three,three[device=1x1.8]"

``--calls``: instead, the CPU per call of one replica calling another (a bare deployment that
answers at once, payloads of 1 KB, 100 KB and 700 KB; then the cloud tier of the early-exit plan
called with real hand-off messages, one or four calls in flight, ``max_batch`` 64 and batching
windows of 0, 2.8 and 10 ms, so that with one call in flight every call waits out the window):
what a hop costs beside the compute, and what a process costs while it waits.
Linux only (``/proc``).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from loadgen import run_load  # sibling scripts
from proc_cpu import cpu_times
from serve_report import DEFAULT_CHECKPOINT, DEFAULT_MAX_DROP
from serve_setup import DEFAULT_LINK, THREE, prepare, wait_served

GROUPS = ("tier-device", "tier-edge", "tier-cloud", "tier-noop", "tier-all", "tier-whole", "ingress", "haproxy",
          "HAProxyManager", "ServeController", "raylet", "gcs_server")


def process_cpu() -> dict[int, tuple[str, float]]:
    """``{pid: (command line, CPU seconds)}`` of every readable process."""
    hz = os.sysconf("SC_CLK_TCK")
    return {pid: (cmd, ticks / hz) for pid, (cmd, ticks) in cpu_times(cmdline=True).items()}


def group_of(cmd: str) -> str:
    for key in GROUPS:
        if key in cmd:
            return key
    return "other"


def cpu_between(before, after) -> dict[str, float]:
    """CPU seconds per group between two readings (processes started in between count whole)."""
    out: dict[str, float] = {}
    for pid, (cmd, t) in after.items():
        used = t - before[pid][1] if pid in before else t
        out[group_of(cmd)] = out.get(group_of(cmd), 0.0) + used
    return out


def parse_run(text: str) -> tuple[str, dict[str, tuple[int, float]]]:
    """``three[device=2x0.9,edge=1x0.1]`` -> ``("three", {"device": (2, 0.9), "edge": (1, 0.1)})``."""
    m = re.fullmatch(r"((?:noop|three|one|whole)(?:-apart)?)(?:\[(.*)\])?", text.strip())
    if not m:
        raise SystemExit(f"--runs: {text!r} is not noop, three, one or whole (or one of them with -apart), "
                         "optionally with [tier=RxC,...]")
    over = {}
    for part in filter(None, (m.group(2) or "").split(",")):
        tier, _, rc = part.partition("=")
        r, _, c = rc.partition("x")
        try:
            over[tier.strip()] = (int(r), float(c))
        except ValueError:
            raise SystemExit(f"--runs: {part!r} should be TIER=REPLICASxCPUS, e.g. device=2x0.9") from None
    return m.group(1), over


def with_overrides(plan, over):
    names = {t.name for t in plan.tiers}
    for tier in over:
        if tier not in names:
            raise SystemExit(f"--runs: this plan has no tier {tier!r} (it has {', '.join(sorted(names))})")
    return replace(plan, tiers=[replace(t, replicas=over[t.name][0], ray_actor_options={"num_cpus": over[t.name][1]})
                                if t.name in over else t for t in plan.tiers])


def build(a, apart_too: bool = False):
    """serve_load.py's network, thresholds and exports (``serve_setup.prepare``), and its plans for
    ``--samples`` samples a request under this script's names: ``{three, one, whole, noop}`` (and
    with ``apart_too`` the same with ``-apart``), the test pixels sent, the engine's answers (early
    exit, whole), the manifest and the normalised test inputs."""
    a.train_samples, a.epochs, a.past, a.test_samples, a.float16 = 0, 3, None, 4096, False
    a.link, a.split_served = DEFAULT_LINK, True  # serve_load's defaults: the planned split and the forced one
    a.apart, a.both = False, apart_too
    prep = prepare(a, (a.samples,))
    names = (("three", THREE), ("one", "early exit"), ("whole", "whole"))
    plans = {name: prep.plans[key, a.samples] for name, key in names}
    if apart_too:
        plans.update({f"{name}-apart": prep.plans[key, a.samples, "apart"] for name, key in names})
        plans["noop-apart"] = plans["one-apart"]
    plans["noop"] = plans["one"]
    return plans, prep.pixels, {"early": prep.expected, "whole": prep.expected_whole}, prep.manifest, prep.x_test


def measure_runs(a) -> None:
    from eenn.serve import ray_app

    runs = [parse_run(r) for r in re.split(r",(?![^\[]*\])", a.runs) if r.strip()]
    plans, pixels, expected, _, _ = build(a, apart_too=any(name.endswith("-apart") for name, _ in runs))
    probe = io.BytesIO()
    np.save(probe, pixels[:4])
    url = ray_app.start(plans["three"], port=ray_app.free_port(), num_cpus=max(1, round(a.cores)), ingress=a.ingress)
    try:
        for rnd in range(a.rounds):
            for name, over in (runs if rnd % 2 == 0 else runs[::-1]):
                plan = with_overrides(plans[name], over)
                ray_app.redeploy(plan, noop=name.startswith("noop"))
                wait_served(url, probe.getvalue())
                exp = expected["whole" if name.startswith("whole") else "early"]
                run_load(url, pixels, exp, per_request=a.samples, clients=8, seconds=2.0, stops=(2, 3))  # warm-up
                before, t0 = process_cpu(), time.perf_counter()
                r = run_load(url, pixels, exp, per_request=a.samples, clients=a.clients, seconds=a.seconds,
                             stops=(2, 3))
                used, wall = cpu_between(before, process_cpu()), time.perf_counter() - t0
                n = max(r["requests"], 1)
                label = name + ("[" + ",".join(f"{k}={v[0]}x{v[1]:g}" for k, v in over.items()) + "]" if over else "")
                tiers = "; ".join(f"{t.name} {t.replicas}x{t.ray_actor_options.get('num_cpus', 0):g}" for t in plan.tiers)
                parts = ", ".join(f"{k} {1e3 * v / n:.3f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1])
                                  if v / wall > 0.005)
                print(f"round {rnd + 1} {label} ({tiers}): {r['rps']:.0f} req/s, {r['sps']:.0f} samples/s, p99 "
                      f"{r['p99_ms']:.1f} ms, failed {r['failed']}"
                      + ("" if name.startswith("noop") else f", differ {r['differ']}")
                      + f" | {sum(used.values()) / wall:.2f} cores (the load generator's not counted), "
                        f"{1e3 * sum(used.values()) / n:.3f} ms per request: {parts}", flush=True)
    finally:
        ray_app.stop()


def measure_calls(a) -> None:
    """CPU per call of a replica calling another: a bare deployment, then the plan's cloud tier."""
    import ray
    from ray import serve

    from eenn.serve.ray_tiers import TierDeployment, _direct
    from eenn.serve.ray_env import ingress_env
    from eenn.serve.tiers import Tier, start_message
    from eenn.staged import read_segments

    plans, _, _, m, x = build(a)
    three = plans["three"]
    dev, edge = (Tier(m, s, models=read_segments(m, (s.start, s.stop))) for s in three.tiers[:2])
    messages = []  # what the edge hands the cloud: real hand-offs of 128-sample device runs
    for i in range(0, 1024, 128):
        _, c = dev.run_many([dev.read(start_message(m, x[i:i + 128]))])[0]
        if c is not None:
            _, c2 = edge.run_many([edge.read(dev.handoff(c)[0])])[0]
            if c2 is not None:
                messages.append(edge.handoff(c2)[0])
    env = ingress_env(a.ingress)
    os.environ.update(env)
    pkg = str(Path(__file__).resolve().parents[1] / "src")
    ray.init(num_cpus=max(1, round(a.cores)), include_dashboard=False, logging_level="warning",
             runtime_env={"env_vars": {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": pkg}})
    serve.start(logging_config={"log_level": "WARNING", "enable_access_log": False})

    @serve.deployment(max_ongoing_requests=512)
    class Sink:
        async def __call__(self, message: bytes) -> int:
            return len(message)

    @serve.deployment(max_ongoing_requests=512)
    class Caller:
        def __init__(self, target) -> None:
            self.target = _direct(target)

        async def run(self, payloads: list, n: int, in_flight: int) -> float:
            async def loop(j: int) -> None:
                for i in range(n // in_flight):
                    await self.target.remote(payloads[(i + j) % len(payloads)])

            t0 = time.perf_counter()
            await asyncio.gather(*(loop(j) for j in range(in_flight)))
            return time.perf_counter() - t0

    def per_call(handle, payloads, n, in_flight, callee) -> str:
        before = process_cpu()
        wall = handle.run.remote(payloads, n, in_flight).result()
        used = {}
        for pid, (cmd, t) in process_cpu().items():
            if pid in before and (callee in cmd or "caller" in cmd):
                k = "callee" if callee in cmd else "caller"
                used[k] = used.get(k, 0.0) + t - before[pid][1]
        return (f"{n / wall:.0f} calls/s, per call: callee {1e3 * used.get('callee', 0) / n:.3f} ms, caller "
                f"{1e3 * used.get('caller', 0) / n:.3f} ms of the cores")

    try:
        h = serve.run(Caller.options(name="caller", ray_actor_options={"num_cpus": 0}).bind(
            Sink.options(name="sink", ray_actor_options={"num_cpus": 0}).bind()), name="calls", route_prefix=None)
        h.run.remote([b"x"], 100, 1).result()
        for size in (1_000, 100_000, 700_000):
            print(f"bare deployment, {size} B a call, 4 in flight: {per_call(h, [b'x' * size], 2000, 4, 'sink')}",
                  flush=True)
        serve.delete("calls")
        clean = {k: v for k, v in m.items() if k != "_dir"}
        spec = three.tiers[2]
        settings = {"float16": False, "threads": 1, "timeout_s": 10, "next_name": None}
        sizes = [len(Tier.read(edge, msg)) for msg in messages]
        for wait_ms in (0.0, 2.8, 10.0):
            cloud = TierDeployment.options(name="tier-cloud", ray_actor_options={"num_cpus": 0},
                                           max_ongoing_requests=512).bind(
                clean, {**asdict(spec), "max_batch": 64, "batch_wait_ms": wait_ms},
                read_segments(m, (spec.start, spec.stop)), None, settings)
            h = serve.run(Caller.options(name="caller", ray_actor_options={"num_cpus": 0}).bind(cloud),
                          name="calls", route_prefix=None)
            h.run.remote(messages, 50, 1).result()
            for in_flight in (1, 4):
                print(f"cloud tier, window {wait_ms:g} ms, {in_flight} in flight (messages of {min(sizes)}-{max(sizes)} "
                      f"samples): {per_call(h, messages, 600, in_flight, 'tier-cloud')}", flush=True)
            serve.delete("calls")
    finally:
        serve.shutdown()
        ray.shutdown()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP)
    p.add_argument("--split", default="0-1,2,3", help="segments of the device, edge and cloud tiers")
    p.add_argument("--runs", default="noop,one,three,whole")
    p.add_argument("--samples", type=int, default=1, help="samples a request")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cores", type=float, default=float(os.cpu_count() or 1))
    p.add_argument("--plan-clients", type=int, default=32)
    p.add_argument("--batch-cap", type=int, default=128)
    p.add_argument("--front-ms", type=float, default=0.9)
    p.add_argument("--ingress", default="haproxy", choices=["haproxy", "proxy"])
    p.add_argument("--calls", action="store_true", help="measure the cost of a call between replicas instead")
    a = p.parse_args()
    if not os.path.isdir("/proc/self"):
        raise SystemExit("serve_cpu.py reads /proc: Linux only")
    torch.set_num_threads(1)
    (measure_calls if a.calls else measure_runs)(a)


if __name__ == "__main__":
    main()
