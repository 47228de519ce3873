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
``eenn.serve.plan.plan_splits`` chooses the split of the segments over a device, an edge and a
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
for batch requests), leaving ``--front-ms`` per request to the HTTP front; the no-op deployment
takes the early-exit plan's first tier's.

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
import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from loadgen import run_load  # sibling scripts (benchmarks/loadgen.py, benchmarks/serve_report.py)
from serve_report import DEFAULT_CHECKPOINT, DEFAULT_MAX_DROP, final_line, paired_rounds, render

NAMES = ["device", "edge", "cloud"]


# ------------------------------------------------------------------------------- model and plans
def thresholds_for(scores: np.ndarray, bounds, past: float, front: float) -> list[float]:
    """max_prob thresholds for the non-final exits from validation scores ``[E-1, N]``: a share
    ``past`` of the samples that reach a non-final tier go on past it (``past`` past the first,
    ``past**2`` past the second, ...); of those a tier answers, its first exit takes ``front`` and
    its later exits the rest in equal parts."""
    n = scores.shape[1]
    goals, reach = [], 1.0  # share of all samples still running after each non-final exit
    for t, (lo, hi) in enumerate(bounds[:-1]):
        out = reach * past
        exits = list(range(lo, hi))
        answered = reach - out
        for j, _ in enumerate(exits):
            if len(exits) == 1:
                done = answered
            else:
                done = answered * (front + (1 - front) * j / (len(exits) - 1))
            goals.append(reach - done)
        reach = out
    alive = np.ones(n, bool)
    th = []
    for k, goal in enumerate(goals):
        s = scores[k][alive]
        leave = alive.sum() - goal * n  # samples to stop here
        q = 1.0 - leave / max(len(s), 1)  # a sample exits when its score >= the threshold
        t = float(np.quantile(s, min(max(q, 0.0), 1.0)))
        th.append(t)
        alive &= ~(scores[k] >= t)
    return th


def parse_split(text: str, num_exits: int):
    """``"0-1,2,3"`` -> ``[(0, 2), (2, 3), (3, 4)]`` (one entry per tier: k or a-b, consecutive)."""
    bounds, at = [], 0
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        lo, hi = int(lo), int(hi or lo)
        if lo != at or hi < lo:
            raise SystemExit(f"--split {text!r}: tiers take consecutive segments from 0")
        bounds.append((lo, hi + 1))
        at = hi + 1
    if at != num_exits or len(bounds) != 3:
        raise SystemExit(f"--split {text!r}: three tiers covering segments 0-{num_exits - 1}")
    return bounds


def build_model(a):
    import eenn
    from eenn.data import InputSpec

    data = eenn.load_dataset("fashion_mnist", data_dir=a.data_dir)
    ckpt = a.checkpoint
    if ckpt and Path(ckpt).exists():
        net = eenn.load(ckpt)
        source = f"the checkpoint {ckpt}"
    else:
        # the recipe of benchmarks/deploy_speed.py, which writes the same default checkpoint
        torch.manual_seed(0)
        net = eenn.create_network("resnet20", in_channels=1, num_classes=10, input_size=data.info.input_size,
                                  exits="linear:3")
        from dataclasses import replace

        sub = data
        if a.train_samples and a.train_samples < len(data.train):
            sub = replace(data, train=data.train.subset(range(a.train_samples)))
        eenn.fit(net, sub, "joint", epochs=a.epochs, lr=0.05, progress=False)
        if ckpt:
            eenn.save(net, ckpt)
        source = (f"a ResNet-20 trained here for {a.epochs} epoch(s) on {len(sub.train)} images"
                  + (f" (saved to {ckpt})" if ckpt else ""))
    net.eval()
    if net.input_spec is None:
        net.input_spec = InputSpec.from_info(data.info)
    return data, net, source


def exit_scores(net, split) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every exit's logits on a split, and the labels, and the uint8 pixels."""
    import eenn

    x, y = next(iter(eenn.TensorLoader(split, len(split), input_spec=net.input_spec)))
    with torch.no_grad():
        logits = torch.cat([net(x[i:i + 1000]).logits for i in range(0, len(x), 1000)], 1)
    return logits, y, x


def make_plan(model_dir, bounds, names, speeds, depth, manifest, *, cores, clients, samples=1, batch_cap=64,
              threads=1, float16=False, front_s=0.0):
    from eenn.serve import TierPlan
    from eenn.serve.sizing import propose_serving

    props, lines = propose_serving(manifest, bounds, speeds, depth, cores=cores, concurrency=clients,
                                   samples_per_request=samples, batch_cap=batch_cap, front_s=front_s)
    tiers = [{"name": n, "segments": f"{lo}-{hi - 1}", **p.options()} for n, (lo, hi), p in zip(names, bounds, props)]
    return TierPlan.from_dict({"model": str(model_dir), "timeout_s": 10, "threads": threads, "float16": float16,
                               "tiers": tiers}), props, lines


def wait_served(url: str, body: bytes, timeout: float = 300.0) -> None:
    """Until the deployment answers a request whole (every replica up), bounded."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            req = urllib.request.Request(url + "/predict", data=body, headers={"Content-Type": "application/x-npy"})
            with urllib.request.urlopen(req, timeout=30) as r:
                out = json.loads(r.read())
            rows = out.get("predictions", [out])
            if not any(p["degraded"] for p in rows):
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer whole within {timeout:g} s")
        time.sleep(0.5)


def prepare(a, sizes):
    """What the deployments are built from (this benchmark's and benchmarks/serve_cpu.py's): the
    network and its thresholds (``--max-drop`` or ``--past``), the engine's answers on the test
    images sent, the two exports (early exit, whole network), the segment times, and one plan per
    deployment and request size in ``sizes``, proposed for ``--plan-clients`` clients."""
    import eenn
    from eenn.engine import DynamicEngine
    from eenn.exporter import export, load_manifest
    from eenn.policies import ExitPolicy
    from eenn.serve.plan import LinkSpec, TierSpeed, measure_segments, plan_splits

    data, net, source = build_model(a)
    bounds_ee = parse_split(a.split, net.num_exits)
    if a.past is not None:
        val_logits, _, _ = exit_scores(net, data.val)
        th = thresholds_for(val_logits[:-1].softmax(-1).max(-1).values.numpy(), bounds_ee, a.past, a.front)
    else:
        th = eenn.calibrate("max_prob", eenn.collect_outputs(net, data.val), net.cost(),
                            {"max_drop": a.max_drop}).thresholds.tolist()
    _, test_y, _ = exit_scores(net, data.test)
    n_test = min(a.test_samples, len(data.test))
    pixels = data.test.x[:n_test].numpy()  # uint8 [N, 1, 28, 28]: sent as is, normalised by the server
    assert pixels.dtype == np.uint8, pixels.dtype
    x_test = next(iter(eenn.TensorLoader(data.test, len(data.test), input_spec=net.input_spec)))[0][:n_test]
    policy = ExitPolicy("max_prob", th)
    whole_policy = ExitPolicy("max_prob", [float("inf")] * 3)
    with torch.no_grad():
        eng = DynamicEngine(net, policy)(x_test)
        eng_whole = DynamicEngine(net, whole_policy)(x_test)
    expected = list(zip(eng.prediction.tolist(), eng.exit.tolist()))
    expected_whole = list(zip(eng_whole.prediction.tolist(), eng_whole.exit.tolist()))
    depth = (torch.bincount(eng.depth, minlength=4).float() / len(eng.depth)).tolist()
    acc = float((eng.prediction == test_y[:n_test]).float().mean())
    acc_whole = float((eng_whole.prediction == test_y[:n_test]).float().mean())
    for name, (_, stop) in zip(NAMES, bounds_ee[:-1]):
        if sum(depth[stop:]) < 0.01:  # e.g. a network trained too briefly: every sample leaves early
            print(f"warning: under these thresholds {100 * sum(depth[stop:]):.1f}% of the test samples go past the "
                  f"{name} tier, so the tiers after it are not measured; train the network longer or set --past",
                  flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="eenn-serve-load-"))
    m_ee = export(net, tmp / "early", policy=policy, validation={"depth_distribution": depth,
                                                                 "exit_distribution": depth})
    export(net, tmp / "whole", policy=whole_policy)
    manifest = load_manifest(tmp / "early")
    seg1, answer1 = measure_segments(manifest)
    segb, _ = measure_segments(manifest, batch=32, repeats=20)
    print(f"model: {source}; exits after segments {[s['exit_name'] for s in m_ee['segments']]}, MACs per segment "
          f"{[s['macs'] for s in m_ee['segments']]}; thresholds {[round(t, 4) for t in th]}; test accuracy "
          f"{100 * acc:.2f}% early exit, {100 * acc_whole:.2f}% whole; test depth {[round(d, 3) for d in depth]}; "
          f"segment ms at batch 1 {[round(1e3 * t, 3) for t in seg1]}, at batch 32 {[round(1e3 * t, 3) for t in segb]}",
          flush=True)
    speed = lambda name: TierSpeed(name, segment_s=seg1, answer_s=answer1, batch_s=segb, batch=32)
    # the early-exit plan: the split eenn plan chooses for three tiers that are all this machine
    chosen = plan_splits(manifest, [speed(n) for n in NAMES], [LinkSpec(*a.link)] * (len(NAMES) - 1), depth)
    planned = [(n, b) for n, b in zip(NAMES, chosen.bounds) if b[1] > b[0]]
    print(f"split chosen by eenn.serve.plan.plan_splits for {len(NAMES)} tiers at this machine's speed joined by "
          f"{a.link[0]:g} B/s, {1e3 * a.link[1]:g} ms links: "
          + ", ".join(f"{n}: segments {lo}-{hi - 1}" for n, (lo, hi) in planned)
          + f" (expected {1e3 * chosen.predicted_s:.3f} ms a sample)", flush=True)
    deployments = [("early exit", [b for _, b in planned], [n for n, _ in planned], depth),
                   ("whole", [(0, 4)], ["whole"], [0.0, 0.0, 0.0, 1.0])]
    if a.split_served:
        if bounds_ee == [b for _, b in planned]:
            print("the forced split is the chosen one: served once", flush=True)
        else:
            deployments.append(("early exit, three tiers", bounds_ee, NAMES, depth))
    # one plan per deployment and request size: proposed for --plan-clients clients sending that many samples
    plans = {}
    for per_request in sizes:
        for name, bounds, names, dep in deployments:
            model_dir = tmp / ("whole" if name == "whole" else "early")
            plan, props, lines = make_plan(model_dir, bounds, names, [speed(n) for n in names], dep, manifest,
                                           cores=a.cores, clients=a.plan_clients, samples=per_request,
                                           batch_cap=a.batch_cap, float16=a.float16 and len(bounds) > 1,
                                           front_s=a.front_ms / 1000.0)
            plans[name, per_request] = plan
            print(f"plan ({name}, proposed for {a.plan_clients} clients x {per_request} sample(s) on "
                  f"{a.cores:g} cores):", flush=True)
            for q in props:
                print(f"  {q.name}: " + "; ".join(q.reasons))
            for line in lines:
                print(f"  {line}")
    return SimpleNamespace(source=source, th=th, bounds_ee=bounds_ee, pixels=pixels, expected=expected,
                           expected_whole=expected_whole, depth=depth, acc=acc, acc_whole=acc_whole, m_ee=m_ee,
                           manifest=manifest, seg1=seg1, segb=segb, plans=plans, chosen=chosen, x_test=x_test.numpy())


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
    p.add_argument("--link", type=lambda t: tuple(float(v) for v in t.split(",")), default=(1e9, 0.00035),
                   metavar="BYTES_PER_S,LATENCY_S",
                   help="the link between tiers on this machine that the planned split assumes (default 1e9,0.00035: "
                        "a Ray Serve call between two replicas on the 2-core EPYC costs 0.35 ms of a core on each "
                        "side, benchmarks/serve_cpu.py --calls)")
    p.add_argument("--no-split", dest="split_served", action="store_false",
                   help="skip the early exit forced into the three tiers of --split")
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
    prep = prepare(a, (1, a.batch_samples))
    source, th, bounds_ee, pixels, expected, expected_whole = (prep.source, prep.th, prep.bounds_ee, prep.pixels,
                                                               prep.expected, prep.expected_whole)
    depth, acc, acc_whole, m_ee, plans = prep.depth, prep.acc, prep.acc_whole, prep.m_ee, prep.plans

    probe = io.BytesIO()
    np.save(probe, pixels[:4])
    probe = probe.getvalue()
    results: list[dict] = []
    stops = (bounds_ee[0][1], bounds_ee[1][1])

    paired: list[dict] = []  # the Ray rounds behind the final line (--rounds)

    def measure(mode: str, deployment: str, url: str, per_request: int, counts=None, round_=None) -> None:
        exp = expected_whole if deployment == "whole" else expected
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

    runs = [(name, n, False) for name in ("early exit", "whole", "early exit, three tiers")
            for n in (1, a.batch_samples) if (name, n) in plans]
    for mode in a.modes.split(","):
        if mode == "local":
            from eenn.serve import LocalServer

            for name, per_request, _ in runs:
                server = LocalServer(plans[name, per_request])
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
                seq = [("no-op", 1, True), ("early exit", 1, False), ("early exit, three tiers", 1, False),
                       ("whole", a.batch_samples, False), ("early exit", a.batch_samples, False),
                       ("early exit, three tiers", a.batch_samples, False)]
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
    if ("early exit, three tiers", 1) in plans and "ray" in a.modes:  # what the hops cost, before the plan's line
        summary = final_line(results, a.batch_samples, paired, "early exit, three tiers") + "\n" + summary
    report = render(a, source, m_ee, th, acc, acc_whole, depth, bounds_ee, (prep.seg1, prep.segb), plans, results,
                    summary,
                    time.perf_counter() - t_start, (load_start, os.getloadavg()[0]), rounds, prep.chosen)
    if a.doc:
        Path(a.doc).write_text(report)
        print(f"wrote {a.doc}", flush=True)
    print(summary)


if __name__ == "__main__":
    main()
