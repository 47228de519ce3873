"""Serving under load: the early-exit plan against the same network served whole, in-process and
on Ray Serve, with a do-nothing Ray Serve deployment as the framework's ceiling.

Fashion-MNIST (the real test split). The network is the trained checkpoint ``--checkpoint``
(default ``runs/resnet20-peer.safetensors``, a ResNet-20 with three linear exits trained on the
full training split for 3 epochs, 91% on the test split: the network of docs/RESULTS.md's ResNet
lines, made by ``benchmarks/deploy_speed.py --checkpoint runs/resnet20-peer.safetensors --limit 0
--epochs 3``), or one trained here with the same recipe when the file is absent. The max_prob
thresholds are calibrated on the validation split by ``eenn.calibrate`` for at most a
``--max-drop`` drop in accuracy against the final exit (0.005: the goal the serving monitor holds;
then about a fifth of the samples go past the device tier and a fifth of those past the edge), or
(``--past P``) set so that a share P of the samples that reach a non-final tier go past it, to
load the later tiers and the hops between them (the measured shares on the test split are printed
either way). The early-exit plan is the one ``eenn plan`` would give for this machine:
``eenn.serve.splits.plan_splits`` chooses the split of the segments over a device, an edge and a
cloud tier that all run at this machine's measured segment times, joined by ``--link`` (a Ray call
between two replicas on one machine); tiers left empty are dropped. On one machine a split only
adds hops, so it proposes one tier holding every segment. The same exits forced into three tiers
(``--split``: device = segments 0-1, edge = segment 2, cloud = segment 3; float32 hand-off unless
``--float16``) are served too, beside it, to show what the hops between tiers cost where the
tiers share the cores (``--no-split`` skips them; ``--split`` also names the tiers whose shares
are counted, and the ones ``--past`` loads). The same export with thresholds that never
fire, as one tier, is the static baseline ("whole network"). Every deployment's batching,
replicas and CPUs come from ``eenn.serve.sizing.propose_serving`` for ``--plan-clients`` clients
on ``--cores`` cores, from segment times measured here (one plan for single-sample requests, one
for batch requests), counting ``--front-ms`` per request for the HTTP front; as ``eenn plan``
proposes by default, each deployment's first tier runs in the ingress replicas, which are
sized for both (``--apart``: as a deployment of its own, the front's share left to the ingress);
in-process, which has no such call, the plans are sized as with ``--no-with-front``; the no-op
deployment takes the early-exit plan's first tier's settings and layout.

For each deployment and each number of concurrent clients (``--clients``), a closed loop (every
client sends its next request when it has the answer; a separate process, so that the clients do
not share the server's interpreter) for ``--seconds``: requests/s, samples/s, p50/p99 latency,
failed valid requests, answers that differ from the PyTorch engine's (class and exit), degraded
answers and the share of samples past each tier. Single-sample requests and requests carrying
``--batch-samples`` samples (both as ``.npy`` uint8 pixel bodies, normalised by the server).
On Ray (``--ingress``: HAProxy in front of the ingress replica, Ray Serve's high-throughput mode,
or its Python proxy; the no-op deployment is served the same way), ``--rounds`` rounds then measure
the comparisons of the final lines again at 32 clients: each round the no-op, the early exit and
the three tiers with single samples, then the whole network, the early exit and the three tiers
with batches, the order reversing from round to round, and the final lines give the medians of
the rounds: the machine's speed drifts from minute to minute, and the table's runs are minutes
apart. The run ends with the three tiers' line and then the plan's::

    ray at 32 clients, three tiers: N req/s single samples, no-op ceiling C req/s, ...
    ray at 32 clients: N req/s single samples, no-op ceiling C req/s, share S; batches of 32: X
    samples/s early exit, Y samples/s whole network, ratio R

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py [--seconds 8] [--clients 1,8,32,128] [--doc docs/serving.md]
"""
from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
import torch

# sibling scripts (benchmarks/loadgen.py, serve_report.py, serve_setup.py)
from loadgen import run_load
from serve_report import DEFAULT_CHECKPOINT, DEFAULT_MAX_DROP, final_line, paired_rounds, render
from serve_setup import DEFAULT_LINK, THREE, prepare, wait_served


# --------------------------------------------------------------------------------------- the run
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="a multi-exit ResNet-20 (3 exits + final) trained on Fashion-MNIST; trains one if absent")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=3, help="training epochs when there is no checkpoint")
    p.add_argument("--train-samples", type=int, default=0,
                   help="training images when there is no checkpoint (0: the whole training split)")
    p.add_argument("--split", default="0-1,2,3", help="segments of the device, edge and cloud tiers")
    p.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP,
                   help="thresholds calibrated on validation for at most this accuracy drop against the final exit")
    p.add_argument("--past", type=float, default=None,
                   help="instead of --max-drop: the share of the samples reaching a non-final tier that go past it "
                        "(set on validation; e.g. 0.45 to load the later tiers)")
    p.add_argument("--front", type=float, default=0.75,
                   help="share of a tier's answers that its first exit gives (the rest: its later exits)")
    p.add_argument("--float16", action="store_true", help="features cross tiers as float16")
    p.add_argument("--clients", default="1,8,32,128", help="concurrent clients, single-sample requests")
    p.add_argument("--batch-clients", default="1,8,32", help="concurrent clients, batch requests")
    p.add_argument("--batch-samples", type=int, default=32, help="samples per batch request")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per measured point")
    p.add_argument("--modes", default="local,ray")
    p.add_argument("--cores", type=float, default=float(os.cpu_count() or 1), help="cores the plans share")
    p.add_argument("--plan-clients", type=int, default=32, help="the load the plans are proposed for")
    p.add_argument("--batch-cap", type=int, default=128, help="the largest max_batch the plans may propose")
    p.add_argument("--front-ms", type=float, default=0.9,
                   help="the HTTP front's CPU per request the plans leave to it (default 0.9: on the 2-core EPYC, "
                        "Ray Serve's ingress replica 0.54-0.73 ms and HAProxy 0.06-0.09 ms per single-sample request "
                        "at 32 clients, benchmarks/serve_cpu.py)")
    p.add_argument("--link", type=lambda t: tuple(float(v) for v in t.split(",")), default=DEFAULT_LINK,
                   metavar="BYTES_PER_S,LATENCY_S",
                   help="the link between tiers on this machine that the planned split assumes (default 1e9,0.00035: "
                        "a Ray Serve call between two replicas on the 2-core EPYC costs 0.35 ms of a core on each "
                        "side, benchmarks/serve_cpu.py --calls)")
    p.add_argument("--no-split", dest="split_served", action="store_false",
                   help="skip the early exit forced into the three tiers of --split")
    p.add_argument("--apart", action="store_true",
                   help="Ray: every deployment's first tier (and the no-op) as a deployment of its own that the "
                        "ingress calls, as eenn plan --no-with-front proposes (default: in the ingress replicas)")
    p.add_argument("--fixed-wait", action="store_true",
                   help="every tier waits out its batching window whatever arrives (adaptive_wait: false; default: "
                        "the window closes while requests come one at a time)")
    p.add_argument("--rounds", type=int, default=3,
                   help="Ray: rounds of the final lines' comparisons at 32 clients (0: from the table's runs)")
    p.add_argument("--ingress", default="haproxy", choices=["haproxy", "proxy"],
                   help="Ray: HAProxy in front of the ingress replica (Ray Serve's high-throughput mode) or Ray "
                        "Serve's Python proxy; the no-op deployment is served the same way")
    p.add_argument("--test-samples", type=int, default=4096, help="test images sent (round robin)")
    p.add_argument("--doc", default=None, help="write the figures as Markdown here")
    p.add_argument("--note", default="", help="a line for the document (e.g. other load on the machine)")
    a = p.parse_args()
    torch.set_num_threads(1)
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    clients = [int(c) for c in a.clients.split(",") if c]
    batch_clients = [int(c) for c in a.batch_clients.split(",") if c]
    a.both = not a.apart  # in-process there is no call to the first tier to save: plans sized without the front
    prep = prepare(a, (1, a.batch_samples))
    pixels, plans = prep.pixels, prep.plans

    probe = io.BytesIO()
    np.save(probe, pixels[:4])
    probe = probe.getvalue()
    results: list[dict] = []
    stops = (prep.bounds_ee[0][1], prep.bounds_ee[1][1])

    paired: list[dict] = []  # the Ray rounds behind the final line (--rounds)

    def measure(mode: str, deployment: str, url: str, per_request: int, counts=None, round_=None) -> None:
        exp = prep.expected_whole if deployment == "whole" else prep.expected
        wait_served(url, probe)
        run_load(url, pixels, exp, per_request=per_request, clients=8, seconds=min(2.0, a.seconds),
                 stops=stops)  # warm-up
        for c in counts or (clients if per_request == 1 else batch_clients):
            r = run_load(url, pixels, exp, per_request=per_request, clients=c, seconds=a.seconds, stops=stops)
            r.update(mode=mode, deployment=deployment, round=round_)
            (results if round_ is None else paired).append(r)
            agree = ("" if deployment == "no-op" else  # the no-op answers class 0 at exit 0: nothing to compare
                     f", differ {r['differ']}, past device {r['past_device']:.3f}, past edge {r['past_edge']:.3f}")
            print(f"[{mode} {deployment}] {per_request} sample(s)/request, {c} clients: {r['rps']:.1f} req/s, "
                  f"{r['sps']:.0f} samples/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                  f"{r['requests']} requests, failed {r['failed']}, degraded {r['degraded']}{agree}"
                  + (f", errors {r['errors']}" if r["errors"] else ""), flush=True)

    runs = [(name, n, False) for name in ("early exit", "whole", THREE)
            for n in (1, a.batch_samples) if (name, n) in plans]
    for mode in a.modes.split(","):
        if mode == "local":
            from eenn.serve import LocalServer

            for name, per_request, _ in runs:
                server = LocalServer(plans.get((name, per_request, "apart"), plans[name, per_request]))
                url = server.start()
                try:
                    measure("local", name, url, per_request)
                finally:
                    server.stop()
        elif mode == "ray":
            from eenn.serve import ray_app

            t0 = time.perf_counter()
            if a.ingress == "haproxy" and not ray_app.haproxy_available():
                raise SystemExit("this Ray Serve has no HAProxy ingress (Ray >= 2.55, ray[serve] on Linux); "
                                 "run with --ingress proxy")
            url = ray_app.start(plans["early exit", 1], port=ray_app.free_port(), num_cpus=max(1, round(a.cores)),
                                ingress=a.ingress)
            a.ingress_used = ("HAProxy in front of the ingress replica (RAY_SERVE_ENABLE_HA_PROXY=1, "
                              "RAY_SERVE_THROUGHPUT_OPTIMIZED=1)" if a.ingress == "haproxy" else "its Python proxy actor")
            print(f"ray serve up in {time.perf_counter() - t0:.1f} s ({a.ingress_used})", flush=True)
            try:
                for i, (name, per_request, noop) in enumerate(runs + [("no-op", 1, True)]):
                    if i:
                        ray_app.redeploy(plans["early exit" if noop else name, per_request], noop=noop)
                    measure("ray", name, url, per_request)
                # The final lines' comparisons: this machine's speed drifts from minute to minute (Ray's
                # figures by 20-40% between runs), which the table's runs, minutes apart, take in full. Each
                # round measures every point once, in an order that reverses from round to round.
                seq = [("no-op", 1, True), ("early exit", 1, False), (THREE, 1, False),
                       ("whole", a.batch_samples, False), ("early exit", a.batch_samples, False),
                       (THREE, a.batch_samples, False)]
                seq = [r for r in seq if r[2] or (r[0], r[1]) in plans]
                for rnd in range(1, a.rounds + 1):
                    for name, per_request, noop in (seq if rnd % 2 else seq[::-1]):
                        ray_app.redeploy(plans["early exit" if noop else name, per_request], noop=noop)
                        measure("ray", name, url, per_request, counts=[32], round_=rnd)
            finally:
                ray_app.stop()
        else:
            raise SystemExit(f"unknown mode {mode!r} (local, ray)")

    rounds = paired_rounds(paired, a.batch_samples)
    for line in rounds:
        print(line)
    summary = final_line(results, a.batch_samples, paired)
    if (THREE, 1) in plans and "ray" in a.modes:  # what the hops cost, before the plan's line
        summary = final_line(results, a.batch_samples, paired, THREE) + "\n" + summary
    report = render(a, prep, results, summary, time.perf_counter() - t_start, (load_start, os.getloadavg()[0]),
                    rounds)
    if a.doc:
        Path(a.doc).write_text(report)
        print(f"wrote {a.doc}", flush=True)
    print(summary)


if __name__ == "__main__":
    main()
