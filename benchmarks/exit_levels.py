"""Where an early exit's time goes at a given batch size: the cost of leaving at each exit.

Exports a network (a saved one, --checkpoint, or a ViT with random weights, --vit-dim, whose
thresholds are set to give the exit mix --mix on test images: timing depends on where samples
leave, not on what they answer), then times with onnxruntime:

- the static network (``static.onnx``);
- the fused graph (one call per batch, the exit rule inside) with every sample made to leave at
  exit k, for each k (the thresholds are an input of the graph: 2 fires nobody, -1 everyone);
- the fused graph on test images with the calibrated thresholds, beside the MAC speed-up they give.

Prints microseconds per sample and ends with the line
``levels: static S us; exit k: T0 .. TE us; measured X.XXx for Y.YYx MACs, ratio R``.

    .venv/bin/python benchmarks/exit_levels.py --checkpoint runs/fmnist-vit/B-NET/best.safetensors
    .venv/bin/python benchmarks/exit_levels.py --vit-dim 128 --mix 0.818,0.131,0.034,0.016,0,0.001
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import eenn
from eenn.exporter import export
from eenn.inference import tune_cpu_allocator
from eenn.staged import StagedRunner, _caller, _session


def per_sample_us(fn, x, batch, warm=0.05, repeats=5):
    """Median over ``repeats`` passes over ``x`` in batches, after ``warm`` seconds of untimed runs."""
    parts = [x[i:i + batch] for i in range(0, len(x), batch)]
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warm:
        fn(parts[0])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in parts:
            fn(p)
        times.append((time.perf_counter() - t0) / len(x))
    return 1e6 * float(np.median(times))


def mix_thresholds(net, data, mix):
    """max_prob thresholds under which the test images leave at the exits in the shares ``mix``."""
    probs = eenn.collect_outputs(net, data.test).logits.softmax(-1).amax(-1)  # [E, N]
    alive, th = torch.ones(probs.shape[1], dtype=torch.bool), []
    for k in range(net.num_exits - 1):
        want = int(round(mix[k] * probs.shape[1]))
        score = probs[k][alive].sort(descending=True).values
        t = float(score[want - 1]) if want > 0 else 2.0
        th.append(t)
        alive &= ~(probs[k] >= t)
    return eenn.ExitPolicy("max_prob", th)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a saved network (max_prob calibrated on validation for --max-drop)")
    p.add_argument("--vit-dim", type=int, help="instead: a ViT of this width (6 blocks, 4 heads), random weights")
    p.add_argument("--vit-patch", type=int, default=7, help="its patch size (7: 16 patch tokens, 4: 49)")
    p.add_argument("--mix", default="0.818,0.131,0.034,0.016,0,0.001", help="exit shares for --vit-dim")
    p.add_argument("--max-drop", type=float, default=0.01)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads")
    p.add_argument("--samples", type=int, default=512)
    a = p.parse_args()
    if (a.checkpoint is None) == (a.vit_dim is None):
        p.error("give --checkpoint or --vit-dim")
    tune_cpu_allocator()
    torch.manual_seed(0)
    data = eenn.load_dataset("fashion_mnist")
    if a.checkpoint:
        net = eenn.load(a.checkpoint).eval()
        net.input_spec = net.input_spec or eenn.InputSpec.from_info(data.info)
        policy = eenn.calibrate("max_prob", eenn.collect_outputs(net, data.val), net.cost(), {"max_drop": a.max_drop})
    else:
        net = eenn.create_network("vit", in_channels=1, num_classes=10, input_size=28, exits="all", head="linear",
                                  dim=a.vit_dim, depth=6, heads=4, patch_size=a.vit_patch).eval()
        net.input_spec = eenn.InputSpec.from_info(data.info)
        policy = mix_thresholds(net, data, [float(v) for v in a.mix.split(",")])
    E = net.num_exits
    with tempfile.TemporaryDirectory() as d:
        export(net, d, policy=policy)
        static = _caller(_session(Path(d, "static.onnx").read_bytes(), a.threads))  # called as the runner calls
        runner = StagedRunner(d, threads=a.threads)
        fused = runner._fused_for(a.batch)
        x = net.preprocess(data.test.x[: a.samples]).numpy()
        s = per_sample_us(lambda v: static({"input": v}), x, a.batch)
        level = []
        for k in range(E):
            th = np.full(max(E - 1, 1), 2.0, np.float32)
            th[k:] = -1.0
            level.append(per_sample_us(lambda v, th=th: fused({"input": v, "thresholds": th}), x, a.batch))
        e = per_sample_us(runner, x, a.batch)
        exits = runner(x)["exit"]
    mix = np.bincount(exits, minlength=E) / len(exits)
    cost = net.cost()
    mac_speedup = cost.macs[-1] / cost.expected_macs(mix.tolist())
    print(f"{f'ViT width {a.vit_dim}, patches {a.vit_patch}, random weights' if a.vit_dim else a.checkpoint}: {cost.macs[-1] / 1e6:.2f}M MACs; "
          f"batch {a.batch}, onnxruntime {a.threads} thread(s), {a.samples} test images; exit mix {np.round(mix, 3).tolist()}")
    print("| leaves at | us per sample | of the static network's time | of its MACs |\n|---|---|---|---|")
    for k, t in enumerate(level):
        print(f"| exit {k} | {t:.1f} | {t / s:.2f} | {cost.dynamic_macs[k] / cost.macs[-1]:.2f} |")
    print(f"| static network | {s:.1f} | 1.00 | 1.00 |")
    print(f"levels: static {s:.1f} us; exit k: {' '.join(f'{t:.1f}' for t in level)} us; "
          f"measured {s / e:.2f}x for {mac_speedup:.2f}x MACs, ratio {s / e / mac_speedup:.2f}")


if __name__ == "__main__":
    main()
