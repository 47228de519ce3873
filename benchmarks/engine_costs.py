"""Where the dynamic engine's time goes, beside benchmarks/engine_speed.py: per segment, with
glibc's default allocator and then with eenn.inference.tune_cpu_allocator (this order: the
setting cannot be undone in a process), eager and optimised for inference; and what the exits
cost on top of the static backbone when no sample leaves (heads, layout changes at segment
ends, decisions).

    .venv/bin/python benchmarks/engine_costs.py --checkpoint runs/engine-speed.safetensors
"""
import argparse
import itertools
import statistics
import time

import torch

import eenn
from eenn.engine import DynamicEngine
from eenn.inference import tune_cpu_allocator


def median_ms(fn, inputs, repeats):
    with torch.no_grad():
        for x in inputs[:3]:
            fn(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for x in inputs:
                fn(x)
            times.append((time.perf_counter() - t0) / len(inputs))
    return 1e3 * statistics.median(times)


def segment_times(engine, x, repeats):
    with torch.no_grad():
        states = [x]
        for k in range(engine.net.num_exits):
            states.append(engine.forward_segment(k, states[-1])[0])
    return [median_ms(lambda s, k=k: engine.forward_segment(k, s), [states[k]], repeats)
            for k in range(engine.net.num_exits)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a trained network (benchmarks/engine_speed.py makes one)")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=9)
    a = p.parse_args()
    data = eenn.load_dataset(a.dataset, limit=4096)
    info = data.info
    net = eenn.load(a.checkpoint).eval()
    x = next(iter(eenn.TensorLoader(data.test, max(a.batch, 256), mean=info.mean, std=info.std)))[0]
    xb, ones = x[:a.batch], list(x[:200].split(1))
    cost = net.cost()
    mac_shares = [m / cost.macs[-1] for m in cost.macs]
    print(f"{torch.get_num_threads()} threads; MAC share at each exit: "
          f"{', '.join(f'{100 * s:.0f}%' for s in mac_shares)}\n")
    print(f"Segments at batch {a.batch} (ms per batch, heads included), and their cumulative share of the total:\n")
    print("| allocator | network | segment times | total | cumulative share |")
    print("|---|---|---|---|---|")
    never = [float("inf")] * (net.num_exits - 1)
    engines = {"eager": DynamicEngine(net, "max_prob", never),
               "optimized": DynamicEngine(net, "max_prob", never, optimize=True)}
    for allocator in ("glibc defaults", "tuned"):
        if allocator == "tuned":
            tune_cpu_allocator()
        for name, e in engines.items():
            seg = segment_times(e, xb, a.repeats)
            total = sum(seg)
            shares = [v / total for v in itertools.accumulate(seg)]
            print(f"| {allocator} | {name} | {', '.join(f'{v:.1f}' for v in seg)} | {total:.1f} | "
                  f"{', '.join(f'{100 * s:.0f}%' for s in shares)} |", flush=True)
    print("\nWhat the exits cost when no sample leaves (ms per sample; tuned allocator):\n")
    print("| batch | network | static backbone | segments with heads | engine (heads + decisions) |")
    print("|---|---|---|---|---|")
    for batch, inputs in ((1, ones), (a.batch, list(x.split(a.batch)))):
        for name, e in engines.items():
            def segments(c, e=e):
                s = c
                for k in range(net.num_exits):
                    s = e.forward_segment(k, s)[0]
            per = [median_ms(f, inputs, a.repeats) / batch for f in (e.static, segments, e)]
            print(f"| {batch} | {name} | {per[0]:.4f} | {per[1]:.4f} (+{100 * (per[1] / per[0] - 1):.1f}%) | "
                  f"{per[2]:.4f} (+{100 * (per[2] / per[0] - 1):.1f}%) |", flush=True)


if __name__ == "__main__":
    main()
