"""The main job of the README: build a multi-exit network on the embedded scikit-learn digits,
train every exit jointly, print per-exit accuracy and MACs, then fit the exit thresholds on the
validation split (at most a 1-point drop), run the dynamic engine on the test split and print
the Table-2-style line with the oracle; the report and its plots go to ``out``."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .data import load_dataset
from .network import create_network
from .report import evaluate
from .trainer import evaluate_exits, fit


def run_demo(*, backbone: str = "resnet20", exits="all", epochs: int = 30, seed: int = 0,
             device: str | None = None, out: str | Path | None = "runs/demo", max_drop: float = 0.01,
             repeats: int = 5) -> dict:
    if out is not None and (Path(out) / "config.yaml").is_file():
        raise ValueError(f"{out} is a run directory (it holds config.yaml): the demo's report would replace that "
                         "run's report.md, report.json and plots; give another --out")
    torch.manual_seed(seed)
    data = load_dataset("digits", seed=seed)
    info = data.info
    net = create_network(backbone, in_channels=info.in_channels, num_classes=info.num_classes,
                         input_size=info.input_size, exits=exits)
    print(f"eenn demo: {backbone} with {net.num_exits} exits on digits ({len(data.train)} train / "
          f"{len(data.val)} val / {len(data.test)} test, {info.input_size[0]}x{info.input_size[1]} grey); "
          f"joint training, {epochs} epochs", flush=True)
    t0 = time.perf_counter()
    fit(net, data, "joint", epochs=epochs, batch_size=64, optimizer="adamw", lr=3e-3, weight_decay=5e-4,
        schedule="onecycle", seed=seed, device=device)
    train_s = time.perf_counter() - t0
    test_acc = evaluate_exits(net, data.test)["acc"]
    cost = net.cost()
    print(f"\ntrained in {train_s:.1f} s; per-exit test accuracy and cost (MACs per sample):")
    rows = [("exit", "test acc", "MACs", "of full", "params")]
    for i, name in enumerate(net.exit_names):
        rows.append((name, f"{100 * test_acc[i]:.2f}%", f"{cost.macs[i]:,}", f"{100 * cost.fraction[i]:.1f}%",
                     f"{cost.params[i]:,}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  " + "  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))
    report = evaluate(net, data, policy="max_prob", goal={"max_drop": max_drop}, batch_sizes=(1, 256),
                      timing_samples=(len(data.test), len(data.test)), repeats=repeats, curve_points=10)
    r = report["result"]
    print(f"\nmax_prob thresholds fitted on the validation split for at most a {100 * max_drop:g}-point drop; "
          f"test split, the fastest early-exit path against the fastest static path on this machine:")
    print("  | Architecture | Test acc. | Inf. time (batch 1) | Speed-up | Exits |")
    for row in report.table2_rows():
        print("  | " + " | ".join(row) + " |")
    t = {x["batch_size"]: x for x in report["timing"]}
    for b in (1, 256):
        print(f"  batch {b}: best static {t[b]['best_static']} {t[b]['static_ms_per_sample']:.4f} ms/sample, best early "
              f"exit {t[b]['best_early']} {t[b]['engine_ms_per_sample']:.4f} ms/sample: ratio to the MAC saving "
              f"{t[b]['ratio']:.2f}")
    print(f"  the policy captures {100 * r['captured_share']:.0f}% of the oracle's saving")
    if out is not None:
        paths = report.save(out)
        print(f"\nreport and plots: {', '.join(str(p) for p in paths)}")
    return {"test_accuracy": test_acc, "macs": list(cost.macs), "train_seconds": train_s, "report": report.data}
