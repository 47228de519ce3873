"""Does every baseline objective train? For each data set: `final`, `joint` (uniform, SDN and
PABEE weights) and `heads_only` (exits on the frozen `final` backbone), a few epochs on CPU;
prints first/last training loss and per-exit test accuracy as a Markdown table.

    .venv/bin/python benchmarks/objectives_check.py --dataset digits --epochs 15
    .venv/bin/python benchmarks/objectives_check.py --dataset fashion_mnist --epochs 4
"""
import argparse
import tempfile
from pathlib import Path

import torch

import eenn
from eenn.objectives import HeadsOnly, Joint
from eenn.trainer import evaluate_exits


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--backbone", default="resnet20")
    p.add_argument("--exits", default="linear:3")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    data = eenn.load_dataset(a.dataset, seed=a.seed, limit=a.limit or None)
    info = data.info

    def net():
        torch.manual_seed(a.seed)
        return eenn.create_network(a.backbone, in_channels=info.in_channels, num_classes=info.num_classes,
                                   input_size=info.input_size, exits=a.exits)

    tmp = Path(tempfile.mkdtemp())
    rows = []
    final_ckpt = tmp / "final.safetensors"
    runs = [("final", "final"), ("joint (uniform)", Joint("uniform")), ("joint (sdn)", Joint("sdn")),
            ("joint (pabee)", Joint("pabee")), ("heads_only", None)]
    for label, obj in runs:
        n = net()
        if obj is None:
            obj = HeadsOnly(checkpoint=final_ckpt)
        hist = eenn.fit(n, data, obj, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed, progress=False)
        if label == "final":
            eenn.save(n, final_ckpt)
        acc = evaluate_exits(n, data.test, mean=info.mean, std=info.std)["acc"]
        rows.append((label, hist[0]["train_loss"], hist[-1]["train_loss"], acc, sum(h["epoch_time"] for h in hist)))
    names = net().exit_names
    print(f"{a.backbone}, exits {a.exits}, {a.dataset} ({len(data.train)} train / {len(data.test)} test), "
          f"{a.epochs} epochs, SGD lr {a.lr}, batch {a.batch_size}, seed {a.seed}\n")
    print("| objective | train loss first → last | " + " | ".join(names) + " | train time |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for label, l0, l1, acc, t in rows:
        cells = " | ".join(f"{100 * v:.2f}%" for v in acc)
        print(f"| {label} | {l0:.3f} → {l1:.3f} | {cells} | {t:.0f} s |")


if __name__ == "__main__":
    main()
