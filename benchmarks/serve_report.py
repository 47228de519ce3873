"""The figures of ``benchmarks/serve_load.py`` as text: the final line, the paired rounds behind it
and the Markdown section for docs/serving.md (a sibling module of that script)."""
from __future__ import annotations

import platform
import subprocess

import numpy as np
import torch

from serve_setup import THREE  # a sibling module

# serve_load.py's defaults, which the command written into the document leaves out
DEFAULT_CHECKPOINT = "runs/resnet20-peer.safetensors"
DEFAULT_MAX_DROP = 0.005


def _pick(results, mode, deployment, per_request, clients):
    return next((r for r in results if (r["mode"], r["deployment"], r["per_request"], r["clients"])
                 == (mode, deployment, per_request, clients)), None)


def _round_pairs(paired, batch_samples: int, deployment: str = "early exit") -> list[tuple[int, dict, dict, dict, dict]]:
    """Per complete round: (round, ``deployment`` at 1 sample, no-op, ``deployment`` at a batch, whole at a batch)."""
    out = []
    for rnd in sorted({r["round"] for r in paired}):
        rows = [r for r in paired if r["round"] == rnd]
        four = [_pick(rows, "ray", d, n, 32) for d, n in ((deployment, 1), ("no-op", 1), (deployment, batch_samples),
                                                          ("whole", batch_samples))]
        if all(four):
            out.append((rnd, *four))
    return out


def paired_rounds(paired, batch_samples: int) -> list[str]:
    """One line per round: the single-sample share and the batch ratio of the early-exit plan (and
    of the same exits in three tiers, where the round measured them), measured in the same round."""
    three = {r[0]: r for r in _round_pairs(paired, batch_samples, THREE)}
    part = lambda ee, noop, bee, bwh: (f"single samples {ee['rps']:.0f} / no-op {noop['rps']:.0f} req/s = "
                                       f"{ee['rps'] / noop['rps']:.2f}; batches of {batch_samples} {bee['sps']:.0f} / "
                                       f"whole {bwh['sps']:.0f} samples/s = {bee['sps'] / bwh['sps']:.2f}")
    return [f"round {rnd}: " + part(*r) + ("; three tiers: " + part(*three[rnd][1:]) if rnd in three else "")
            for rnd, *r in _round_pairs(paired, batch_samples)]


def final_line(results, batch_samples: int, paired=(), deployment: str = "early exit") -> str:
    """The one line the run ends with: from the paired rounds when there are any (medians; the share
    and the ratio are the medians of the rounds' own), else from the table's runs. ``deployment``:
    the early-exit plan (the line the benchmark ends with), or the same exits in three tiers."""
    rounds = _round_pairs(paired, batch_samples, deployment)
    f = lambda r, k: f"{r[k]:.0f}" if r else "n/a"
    if rounds:
        med = lambda v: float(np.median(v))
        ee, noop, bee, bwh = ({"rps": med([r[i]["rps"] for r in rounds]), "sps": med([r[i]["sps"] for r in rounds])}
                              for i in (1, 2, 3, 4))
        share = f"{med([r[1]['rps'] / r[2]['rps'] for r in rounds]):.2f}"
        ratio = f"{med([r[3]['sps'] / r[4]['sps'] for r in rounds]):.2f}"
    else:
        ee = _pick(results, "ray", deployment, 1, 32)
        noop = _pick(results, "ray", "no-op", 1, 32)
        bee = _pick(results, "ray", deployment, batch_samples, 32)
        bwh = _pick(results, "ray", "whole", batch_samples, 32)
        share = f"{ee['rps'] / noop['rps']:.2f}" if ee and noop else "n/a"
        ratio = f"{bee['sps'] / bwh['sps']:.2f}" if bee and bwh else "n/a"
    what = "" if deployment == "early exit" else f", {deployment.removeprefix('early exit, ')}"
    return (f"ray at 32 clients{what}: {f(ee, 'rps')} req/s single samples, no-op ceiling {f(noop, 'rps')} req/s, "
            f"share {share}; batches of {batch_samples}: {f(bee, 'sps')} samples/s early exit, "
            f"{f(bwh, 'sps')} samples/s whole network, ratio {ratio}")


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs"
    except Exception:  # noqa: BLE001
        return platform.processor() or platform.machine()


def render(a, prep, results, summary, elapsed, load, rounds=()) -> str:
    """docs/serving.md's "Measured figures": ``prep`` is what serve_setup.prepare built."""
    source, m, th, acc, acc_whole = prep.source, prep.m_ee, prep.th, prep.acc, prep.acc_whole
    depth, bounds, seg1, segb, plans, chosen = prep.depth, prep.bounds_ee, prep.seg1, prep.segb, prep.plans, prep.chosen
    tiers = lambda plan: "; ".join(
        f"{t.name} (segments {t.start}-{t.stop - 1}): max_batch {t.max_batch}, batch_wait_ms {t.batch_wait_ms:g}, "
        f"replicas {t.replicas}, num_cpus {t.ray_actor_options.get('num_cpus', 0):g}"
        + (" (in the ingress replicas)" if t.with_front else "") for t in plan.tiers)
    cmd = " ".join(["OMP_NUM_THREADS=1 python benchmarks/serve_load.py", f"--seconds {a.seconds:g}",
                    "--clients " + (a.clients or '""'), "--batch-clients " + (a.batch_clients or '""'),
                    f"--modes {a.modes}"]
                   + ([f"--checkpoint {a.checkpoint}"] if a.checkpoint != DEFAULT_CHECKPOINT else [])
                   + ([f"--past {a.past:g}"] if a.past is not None else
                      [f"--max-drop {a.max_drop:g}"] if a.max_drop != DEFAULT_MAX_DROP else [])
                   + ([f"--rounds {a.rounds}"] if a.rounds != 3 else [])
                   + ([f"--ingress {a.ingress}"] if a.ingress != "haproxy" else [])
                   + ([f"--doc {a.doc}"] if a.doc else []))
    how = (f"about {a.past:g} of the samples reaching a non-final tier go past it" if a.past is not None
           else f"calibrated for at most a {100 * a.max_drop:g}-point drop")
    out = [
        "## Measured figures",
        "",
        f"Command: `{cmd}` ({elapsed / 60:.1f} min).  ",
        f"Hardware: {_cpu()}, no GPU, loopback HTTP; 1-minute load average {load[0]:.2f} at the start of the "
        f"run, {load[1]:.2f} at its end. torch {torch.__version__}, onnxruntime "
        f"{__import__('onnxruntime').__version__}, ray {__import__('ray').__version__}"
        + (f"; Ray Serve's HTTP ingress: {a.ingress_used}." if "ray" in a.modes else ".")
        + (f" {a.note}" if a.note else ""),
        "",
        f"Model: {source}; exits after {[s['exit_name'] for s in m['segments']]}, MACs per segment "
        f"{[s['macs'] for s in m['segments']]}. max_prob thresholds {[round(t, 4) for t in th]} set on the "
        f"validation split ({how}); test accuracy {100 * acc:.2f}% with early exits, {100 * acc_whole:.2f}% whole. Share of "
        f"the test samples that leave after each segment (their deepest) {[round(d, 3) for d in depth]}: past the device tier "
        f"{sum(depth[bounds[0][1]:]):.3f}, past the edge tier {sum(depth[bounds[1][1]:]):.3f}. Segment times (onnxruntime + policy, one "
        f"thread) {[round(1e3 * t, 3) for t in seg1]} ms at batch 1, {[round(1e3 * t, 3) for t in segb]} ms at "
        f"batch 32.",
        "",
        f"The early-exit plan's split: `eenn.serve.splits.plan_splits` for a device, an edge and a cloud tier at this "
        f"machine's segment times joined by {a.link[0]:g} B/s, {1e3 * a.link[1]:g} ms links (`--link`) chose "
        + (", ".join(f"{t.name}: segments {t.start}-{t.stop - 1}" for t in plans['early exit', 1].tiers)
           + f" ({1e3 * chosen.predicted_s:.3f} ms a sample expected)")
        + ("; the three tiers of `--split` are served beside it" if (THREE, 1) in plans else "")
        + ".",
        "",
        f"Plans (`eenn.serve.sizing.propose_serving` for {a.plan_clients} clients on {a.cores:g} cores, from the "
        f"segment times above, counting {a.front_ms:g} ms of a core per request for the HTTP front, "
        + ("which each first tier leaves to the ingress (`--apart`)" if a.apart else
           "which each first tier runs with, in the ingress replicas (`eenn plan`'s default layout)")
        + "; the no-op takes the early-exit plan's first tier's settings and layout):",
        "",
        *[f"- {name}, {n} sample(s) a request: {tiers(plans[name, n])}"
          + (f"; in-process: {tiers(plans[name, n, 'apart'])}" if (name, n, "apart") in plans else "")
          for name in ("early exit", THREE, "whole") for n in (1, a.batch_samples)
          if (name, n) in plans],
        "",
        "| mode | deployment | samples/request | clients | requests | req/s | samples/s | p50 ms | p99 ms | "
        "failed | degraded | differ | past device | past edge |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        noop = r["deployment"] == "no-op"
        agree = "- | - | -" if noop else f"{r['differ']} | {r['past_device']:.3f} | {r['past_edge']:.3f}"
        out.append(f"| {r['mode']} | {r['deployment']} | {r['per_request']} | {r['clients']} | {r['requests']} | "
                   f"{r['rps']:.1f} | {r['sps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['failed']} | "
                   f"{r['degraded']} | {agree} |")
    out += ["", "`differ`: answers (class and exit) that are not the PyTorch engine's on the same input "
            "(early exit: the calibrated policy; whole: every sample to the final exit). `past device` / "
            "`past edge`: the share of answered samples whose exit is beyond the device / edge tier "
            "(the no-op answers everything at exit 0; nothing to compare).", ""]
    if rounds:
        out += [f"The final lines' comparisons on Ray at 32 clients ({a.seconds:g} s each): each round measures the "
                "no-op, the early exit and the three tiers at single samples, then the whole network, "
                "the early exit and the three tiers at batches, in that order or its reverse (alternating from round "
                "to round), so that the runs compared are close in time; the final lines give the medians of the "
                "rounds:", ""]
        out += [f"- {line}" for line in rounds] + [""]
    out += ["```", *summary.splitlines(), "```", ""]
    return "\n".join(out)
