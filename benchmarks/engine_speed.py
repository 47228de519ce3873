"""Does the MAC saving show on the clock? For a network calibrated on the validation split, the
ratio (measured wall-clock speed-up of the dynamic engine over the static backbone) /
(MAC-predicted speed-up) on test samples, at batch 1 and at a large batch, in one run.
Target: >= 0.85 at both.

Two rows per batch size: the network as trained ("eager") and with every segment, and the
static baseline alike, traced and optimised for inference ("optimized", DynamicEngine(...,
optimize=True); batches of 1 run eagerly there too, where tracing does not pay, so the two batch-1
rows time the same computation twice). glibc is told to keep freed blocks (eenn.inference.tune_cpu_allocator) unless
--default-allocator is given.

    .venv/bin/python benchmarks/engine_speed.py [--dataset fashion_mnist --limit 20000 --epochs 2]
"""
import argparse
import os
import statistics
import time
import torch

import eenn
from eenn.engine import DynamicEngine
from eenn.outputs import collect_outputs
from eenn.inference import tune_cpu_allocator
from eenn.policies import calibrate
from eenn.report import time_engine


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--limit", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--backbone", default="resnet20")
    p.add_argument("--exits", default="linear:3")
    p.add_argument("--policy", default="max_prob")
    p.add_argument("--max-drop", type=float, default=0.01)
    p.add_argument("--batches", default="1,256")
    p.add_argument("--samples", type=int, default=2048, help="test samples timed at the large batch")
    p.add_argument("--micro-batch", type=int, default=None, help="engine and static baseline in pieces of this size")
    p.add_argument("--samples-batch1", type=int, default=512, help="test samples timed one by one")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--checkpoint", help="reuse this trained network if the file exists, else train and save it there")
    p.add_argument("--variants", default="eager,optimized", help="comma-separated: eager, optimized")
    p.add_argument("--default-allocator", action="store_true", help="leave glibc's malloc settings alone")
    a = p.parse_args()
    tuned = False if a.default_allocator else tune_cpu_allocator()
    data = eenn.load_dataset(a.dataset, limit=a.limit or None)
    info = data.info
    if a.checkpoint and os.path.exists(a.checkpoint):
        net = eenn.load(a.checkpoint)
        if net.input_spec is None:  # saved before networks carried their input description
            net.input_spec = eenn.InputSpec.from_info(info)
    else:
        torch.manual_seed(0)
        net = eenn.create_network(a.backbone, in_channels=info.in_channels, num_classes=info.num_classes,
                                  input_size=info.input_size, exits=a.exits)
        eenn.fit(net, data, "joint", epochs=a.epochs, lr=0.05, progress=False)
        if a.checkpoint:
            eenn.save(net, a.checkpoint)
    net.eval()
    val = collect_outputs(net, data.val)
    policy = calibrate(a.policy, val, net.cost(), {"max_drop": a.max_drop})
    th = policy.thresholds
    x_all = next(iter(eenn.TensorLoader(data.test, a.samples, input_spec=net.input_spec)))[0]
    variants = [v for v in a.variants.split(",") if v]
    if not set(variants) <= {"eager", "optimized"} or not variants:
        p.error(f"--variants: eager and/or optimized, got {a.variants!r}")
    engines = {v: DynamicEngine(net, policy, micro_batch=a.micro_batch, optimize=v == "optimized")
               for v in variants}
    print(f"{a.backbone} exits {a.exits} on {a.dataset}, policy {a.policy} calibrated on val for a "
          f"{100 * a.max_drop:.0f}-point drop; thresholds {[round(t, 3) for t in th.tolist()]}; "
          f"{torch.get_num_threads()} threads; glibc malloc {'tuned' if tuned else 'as is'}\n")
    print("| batch | network | micro-batch | samples | static ms/sample | engine ms/sample | measured speed-up "
          "| MAC speed-up | ratio | time-predicted speed-up | engine efficiency |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    notes, cost = [], net.cost()
    for b in (int(v) for v in a.batches.split(",")):
        n = min(len(x_all), a.samples_batch1 if b == 1 else a.samples)
        for v, engine in engines.items():
            t = time_engine(net, engine, x_all[:n], b, repeats=a.repeats)
            bound, shares = time_predicted(net, engine, x_all[:n], b, a.repeats)
            notes.append(f"batch {b}, {v}: cumulative share of the static time at each exit "
                         f"{', '.join(f'{100 * s:.0f}%' for s in shares)} (of the MACs: "
                         f"{', '.join(f'{100 * m / cost.macs[-1]:.0f}%' for m in cost.macs)})")
            print(f"| {b} | {v} | {a.micro_batch or '-'} | {n} | {t['static_ms_per_sample']:.3f} | "
                  f"{t['engine_ms_per_sample']:.3f} | {t['measured_speedup']:.2f}x | {t['mac_speedup']:.2f}x | "
                  f"{t['ratio']:.2f} | {bound:.2f}x | {t['measured_speedup'] / bound:.2f} |", flush=True)
    print("\nratio = measured / MAC-predicted speed-up. time-predicted: what an engine with no overhead of its own "
          "would reach with these kernels (each segment's measured time per sample at this batch, weighted by how many "
          "samples reach it); engine efficiency = measured / time-predicted. The gap between the time- and the "
          "MAC-predicted speed-up is the hardware's: the segments do not cost time in proportion to their MACs.")
    print("\n".join(notes))


@torch.no_grad()
def time_predicted(net, engine, x, b, repeats):
    """Static segments timed one by one at batch ``b`` (median of repeats), weighted by the share
    of samples that reach each segment under the engine's decisions."""
    E = net.num_exits
    depth = torch.cat([engine(c).depth for c in x.split(b)])
    reach = torch.stack([(depth >= k).double().mean() for k in range(E)])
    seg = torch.zeros(E, dtype=torch.float64)
    for c in x.split(b):
        states = [c]
        for k in range(E):
            states.append(engine.forward_segment(k, states[-1])[0])
        for k in range(E):
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                engine.forward_segment(k, states[k])
                ts.append(time.perf_counter() - t0)
            seg[k] += statistics.median(ts)
    static = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for c in x.split(b):
            engine.static(c)
        static.append(time.perf_counter() - t0)
    shares = (seg.cumsum(0) / seg.sum()).tolist()
    return statistics.median(static) / float((reach * seg).sum()), shares


if __name__ == "__main__":
    main()
