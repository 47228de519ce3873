"""What ``benchmarks/serve_load.py`` deploys, and ``benchmarks/serve_cpu.py`` with it: the network
(a checkpoint, or one trained by the same recipe), its max_prob thresholds, the engine's answers on
the test images sent, the two exports (early exit, whole network), the segment times, the split
``eenn plan`` chooses for this machine, and one plan per deployment and request size
(:func:`prepare`). serve_load.py's docstring says how each is chosen. A sibling module of those
scripts."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

NAMES = ["device", "edge", "cloud"]
THREE = "early exit, three tiers"  # the deployment of the exits forced into the three tiers of --split
DEFAULT_LINK = (1e9, 0.00035)  # a Ray Serve call between two replicas on the 2-core EPYC (serve_cpu.py --calls)


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
              threads=1, float16=False, front_s=0.0, with_front=True, adaptive_wait=True):
    from eenn.serve import TierPlan
    from eenn.serve.sizing import propose_serving

    props, lines = propose_serving(manifest, bounds, speeds, depth, cores=cores, concurrency=clients,
                                   samples_per_request=samples, batch_cap=batch_cap, front_s=front_s,
                                   with_front=with_front)
    tiers = [{"name": n, "segments": f"{lo}-{hi - 1}", **p.options(), **({} if adaptive_wait else {"adaptive_wait": False})}
             for n, (lo, hi), p in zip(names, bounds, props)]
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
    from eenn.serve.plan import LinkSpec
    from eenn.serve.splits import TierSpeed, measure_segments, plan_splits

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
    whole_policy = ExitPolicy("max_prob", [float("inf")] * (net.num_exits - 1))  # served by static.onnx
    with torch.no_grad():
        eng = DynamicEngine(net, policy)(x_test)
        eng_whole = DynamicEngine(net, whole_policy)(x_test)
    expected = list(zip(eng.prediction.tolist(), eng.exit.tolist()))
    expected_whole = list(zip(eng_whole.prediction.tolist(), eng_whole.exit.tolist()))
    depth = (torch.bincount(eng.depth, minlength=net.num_exits).float() / len(eng.depth)).tolist()
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
    print(f"split chosen by eenn.serve.splits.plan_splits for {len(NAMES)} tiers at this machine's speed joined by "
          f"{a.link[0]:g} B/s, {1e3 * a.link[1]:g} ms links: "
          + ", ".join(f"{n}: segments {lo}-{hi - 1}" for n, (lo, hi) in planned)
          + f" (expected {1e3 * chosen.predicted_s:.3f} ms a sample)", flush=True)
    planned_bounds = [b for _, b in planned]
    deployments = [("early exit", planned_bounds, [n for n, _ in planned], depth),
                   ("whole", [(0, net.num_exits)], ["whole"], [0.0] * (net.num_exits - 1) + [1.0])]
    if a.split_served:
        if bounds_ee == planned_bounds:
            print("the forced split is the chosen one: served once", flush=True)
        else:
            deployments.append((THREE, bounds_ee, NAMES, depth))
    # one plan per deployment and request size: proposed for --plan-clients clients sending that many samples
    # (a.apart: the first tier as a deployment of its own instead of in the ingress replicas; a.both:
    # the other layout too, under (name, samples, "apart") or (name, samples, "with front"))
    plans = {}
    for per_request in sizes:
        for name, bounds, names, dep in deployments:
            model_dir = tmp / ("whole" if name == "whole" else "early")
            layouts = [not a.apart, a.apart] if getattr(a, "both", False) else [not a.apart]
            for j, with_front in enumerate(layouts):
                plan, props, lines = make_plan(model_dir, bounds, names, [speed(n) for n in names], dep, manifest,
                                               cores=a.cores, clients=a.plan_clients, samples=per_request,
                                               batch_cap=a.batch_cap, float16=a.float16 and len(bounds) > 1,
                                               front_s=a.front_ms / 1000.0, with_front=with_front,
                                               adaptive_wait=not getattr(a, "fixed_wait", False))
                layout = "with front" if with_front else "apart"
                plans[(name, per_request) if j == 0 else (name, per_request, layout)] = plan  # the default first
                print(f"plan ({name}, {layout}, proposed for {a.plan_clients} clients x {per_request} sample(s) on "
                      f"{a.cores:g} cores):", flush=True)
                for q in props:
                    print(f"  {q.name}: " + "; ".join(q.reasons))
                for line in lines:
                    print(f"  {line}")
    return SimpleNamespace(source=source, th=th, bounds_ee=bounds_ee, pixels=pixels, expected=expected,
                           expected_whole=expected_whole, depth=depth, acc=acc, acc_whole=acc_whole, m_ee=m_ee,
                           manifest=manifest, seg1=seg1, segb=segb, plans=plans, chosen=chosen, x_test=x_test.numpy())
