"""Does the MAC saving show on the clock? For a network calibrated on the validation split, the
ratio (measured wall-clock speed-up of the dynamic engine over the static backbone) /
(MAC-predicted speed-up) on test samples, at batch 1 and at a large batch, in one run.
Target: >= 0.85 at both.

    .venv/bin/python benchmarks/engine_speed.py [--dataset fashion_mnist --limit 20000 --epochs 2]
"""
import argparse
import os
import statistics
import time

import torch

import eenn
from eenn.engine import DynamicEngine
from eenn.evaluate import collect_outputs
from eenn.policies import calibrate, decide


def timed(fn, batches, repeats):
    """Median over ``repeats`` of the time to run ``fn`` on every batch (after one warm-up pass)."""
    for x in batches:
        fn(x)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x in batches:
            fn(x)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--checkpoint", help="reuse this trained network if the file exists, else train and save it there")
    a = p.parse_args()
    data = eenn.load_dataset(a.dataset, limit=a.limit or None)
    info = data.info
    if a.checkpoint and os.path.exists(a.checkpoint):
        net = eenn.load(a.checkpoint)
    else:
        torch.manual_seed(0)
        net = eenn.create_network(a.backbone, in_channels=info.in_channels, num_classes=info.num_classes,
                                  input_size=info.input_size, exits=a.exits)
        eenn.fit(net, data, "joint", epochs=a.epochs, lr=0.05, progress=False)
        if a.checkpoint:
            eenn.save(net, a.checkpoint)
    net.eval()
    val = collect_outputs(net, data.val, mean=info.mean, std=info.std)
    th = calibrate(a.policy, val, net.cost(), {"max_drop": a.max_drop})
    x_all = next(iter(eenn.TensorLoader(data.test, a.samples, mean=info.mean, std=info.std)))[0]
    engine = DynamicEngine(net, a.policy, th)
    full = net.cost().macs[-1]
    print(f"{a.backbone} exits {a.exits} on {a.dataset}, policy {a.policy} calibrated on val for a "
          f"{100 * a.max_drop:.0f}-point drop; thresholds {[round(t, 3) for t in th.tolist()]}; "
          f"{torch.get_num_threads()} threads\n")
    print("| batch | samples | static s | engine s | measured speed-up | MAC speed-up | ratio |")
    print("|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for b in (int(v) for v in a.batches.split(",")):
            n = min(len(x_all), 256 if b == 1 else a.samples)
            xs = list(x_all[:n].split(b))
            test = collect_outputs(net, data.test.subset(torch.arange(n)), mean=info.mean, std=info.std)
            dec = decide(a.policy, test, th)
            mac_speedup = full / torch.tensor(net.cost().dynamic_macs, dtype=torch.float64)[dec.depth].mean().item()
            t_static = timed(net.backbone, xs, a.repeats)
            t_engine = timed(engine, xs, a.repeats)
            sp = t_static / t_engine
            print(f"| {b} | {n} | {t_static:.3f} | {t_engine:.3f} | {sp:.2f}x | {mac_speedup:.2f}x | {sp / mac_speedup:.2f} |")


if __name__ == "__main__":
    main()
