"""AEP end to end: train with the AEP objective, prune on the validation split, and compare the
pruned static ensemble with the full one: per-exit validation and test accuracy of the truncated
ensembles, k*, the promised (val) and realised (test) accuracy, and parameters, MACs per sample
and MEASURED latency (median of repeats, batch 1 and batch 256) before and after.

    .venv/bin/python benchmarks/aep_prune.py                      # digits, hybrid weights
    .venv/bin/python benchmarks/aep_prune.py --scheme uniform
    .venv/bin/python benchmarks/aep_prune.py --dataset fashion_mnist --limit 5000 --epochs 3
"""
import argparse
import time

import torch

import eenn
from eenn.functional import SCHEMES
from eenn.objectives.aep import AEP
from eenn.prune import aep_prune, evaluate_ensemble, measure_latency, prune_at


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--backbone", default="resnet20")
    p.add_argument("--exits", default="linear:3")
    p.add_argument("--scheme", default="hybrid", choices=SCHEMES)
    p.add_argument("--learn-weights-from", default="prefix", choices=("prefix", "ensemble", "joint"))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per latency (the median is reported)")
    p.add_argument("--device", default=None)
    a = p.parse_args()
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = eenn.load_dataset(a.dataset, seed=a.seed, limit=a.limit or None)
    info = data.info
    torch.manual_seed(a.seed)
    net = eenn.create_network(a.backbone, in_channels=info.in_channels, num_classes=info.num_classes,
                              input_size=info.input_size, exits=a.exits)
    obj = AEP(a.scheme, learn_weights_from=a.learn_weights_from)
    t0 = time.perf_counter()
    hist = eenn.fit(net, data, obj, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed,
                    device=str(device), progress=False)
    train_s = time.perf_counter() - t0
    net.eval()
    w = obj.weights().cpu()

    res = aep_prune(net, w, data.val, device=device,
                    latency_batch_size=256, latency_repeats=a.repeats)
    test_acc = [evaluate_ensemble(prune_at(net, w, k), data.test, device=device)
                for k in range(net.num_exits)]
    realised = evaluate_ensemble(res.module, data.test, device=device)
    lat1 = [measure_latency(m, net.input_shape, 1, device=device, repeats=a.repeats) for m in (res.full, res.module)]

    print(f"AEP ({a.scheme}, theta from {a.learn_weights_from}) on {a.backbone}, exits {a.exits}, {a.dataset} "
          f"({len(data.train)} train / {len(data.val)} val / {len(data.test)} test), {a.epochs} epochs, SGD lr {a.lr}, "
          f"batch {a.batch_size}, seed {a.seed}; {device}, {torch.get_num_threads()} threads; "
          f"training {train_s:.0f} s, loss {hist[0]['train_loss']:.3f} -> {hist[-1]['train_loss']:.3f}\n")
    print("| exit | weight | val acc (ensemble to here) | test acc (ensemble to here) | MACs to here |")
    print("|---|---|---|---|---|")
    macs = net.cost().dynamic_macs
    for k, name in enumerate(net.exit_names):
        mark = " **k\\***" if k == res.k else ""
        print(f"| {k} {name}{mark} | {w[k]:.3f} | {100 * res.val_acc[k]:.2f}% | {100 * test_acc[k]:.2f}% | {macs[k]:,} |")
    print(f"\nk* = {res.k} ({res.exit_name}): promised (val) accuracy {100 * res.promised_acc:.2f}%, "
          f"realised (test) accuracy {100 * realised:.2f}% (full ensemble: {100 * test_acc[-1]:.2f}%)\n")
    b, f = res.before, res.after
    rows = [("parameters", b.params, f.params), ("MACs / sample", b.macs, f.macs),
            ("latency, batch 1 (ms)", lat1[0], lat1[1]),
            (f"latency, batch {res.latency_batch_size} (ms)", b.latency_ms, f.latency_ms)]
    print("| cost | before (full ensemble) | after (pruned) | after / before |")
    print("|---|---|---|---|")
    for name, x, y in rows:
        cell = (lambda v: f"{v:.3f}") if isinstance(x, float) else (lambda v: f"{v:,}")
        print(f"| {name} | {cell(x)} | {cell(y)} | {y / x:.3f} |")


if __name__ == "__main__":
    main()
