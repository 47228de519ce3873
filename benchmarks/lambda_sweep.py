"""How the cost weight lambda trades accuracy for computation in the gated methods: trains
differentiable branching and EENets networks for a list of lambda values and prints, on the
validation split, the hard rule's accuracy and expected cost (first gate above its threshold,
else the final exit; cost as a fraction of the full network's MACs), the soft expected cost
(mean gamma~_1 under the gates) and the exit distribution, as a Markdown table.

    .venv/bin/python benchmarks/lambda_sweep.py
    .venv/bin/python benchmarks/lambda_sweep.py --dataset fashion_mnist --limit 5000 --epochs 4
"""
import argparse
import time

import torch

import eenn
from eenn.evaluate import collect_outputs
from eenn.objectives.branching import Branching, soft_cost
from eenn.objectives.eenets import EENets, confidence_exit


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def exit_spec(text: str):
    """``"2,5"`` -> stage indices; anything else (``"fine:2"``, ``"all"``) as it is."""
    parts = [p.strip() for p in text.split(",")]
    return [int(p) for p in parts] if all(p.lstrip("-").isdigit() for p in parts) else text


@torch.no_grad()
def validate(net: eenn.MultiExitNetwork, data, version: str) -> dict:
    """Hard-rule accuracy and expected cost, soft expected cost and exit distribution on ``data.val``."""
    logits, gates, y = collect_outputs(net, data.val, mean=data.info.mean, std=data.info.std)
    frac = torch.tensor(net.cost().fraction)
    ex = confidence_exit(gates, version)  # 0.5 (1/N for EENets v3); branching's rule is the 0.5 one
    dist = torch.bincount(ex, minlength=net.num_exits).double() / len(y)
    return {
        "acc": (logits[ex, torch.arange(len(y))].argmax(-1) == y).double().mean().item(),
        "cost": float((dist * frac.double()).sum()),
        "soft": soft_cost(gates, frac).mean().item(),
        "dist": dist.tolist(),
        "final": (logits[-1].argmax(-1) == y).double().mean().item(),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--backbone", default="resnet20")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--exits", default="2,5", help="stage indices ('2,5') or a distribution ('fine:2')")
    p.add_argument("--branching-lams", default="0,0.3,0.8,1,3")
    p.add_argument("--eenets-lams", default="0.1,1,2,3,5")
    p.add_argument("--eenets-version", default="v2")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny nets: 1 is fastest)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data = eenn.load_dataset(a.dataset, seed=a.seed, limit=a.limit or None)
    info = data.info
    if not len(data.val):
        raise SystemExit("this sweep reports on the validation split, which is empty")

    def net(head):
        torch.manual_seed(a.seed)
        return eenn.create_network(a.backbone, in_channels=info.in_channels, num_classes=info.num_classes,
                                   input_size=info.input_size, exits=exit_spec(a.exits), head=head, width=a.width)

    runs = [("branching", lam, "v2", lambda lam: Branching(lam=lam), "branching") for lam in floats(a.branching_lams)]
    runs += [(f"eenets {a.eenets_version}", lam, a.eenets_version,
              lambda lam: EENets(version=a.eenets_version, lam=lam), "eenets") for lam in floats(a.eenets_lams)]
    rows = []
    t0 = time.perf_counter()
    for label, lam, version, make, head in runs:
        n = net(head)
        eenn.fit(n, data, make(lam), epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=a.seed, progress=False)
        rows.append((label, lam, validate(n, data, version)))
    names = net("branching").exit_names
    fractions = net("branching").cost().fraction
    print(f"{a.backbone} (width {a.width}), exits {a.exits} at "
          f"{', '.join(f'{100 * f:.1f}%' for f in fractions)} of the MACs, {a.dataset} "
          f"({len(data.train)} train / {len(data.val)} val), {a.epochs} epochs, SGD lr {a.lr}, "
          f"batch {a.batch_size}, seed {a.seed}; {time.perf_counter() - t0:.0f} s\n")
    print("| method | λ | val acc (hard) | expected cost (hard) | soft expected cost | final-exit acc | "
          "exit distribution (" + ", ".join(names) + ") |")
    print("|---|---|---|---|---|---|---|")
    for label, lam, r in rows:
        dist = " / ".join(f"{100 * v:.0f}%" for v in r["dist"])
        print(f"| {label} | {lam:g} | {100 * r['acc']:.2f}% | {r['cost']:.3f} | {r['soft']:.3f} | "
              f"{100 * r['final']:.2f}% | {dist} |")


if __name__ == "__main__":
    main()
