"""How the cost weight lambda trades accuracy for computation in the gated methods: trains
differentiable branching and EENets networks (their default recipe; ``--literal`` for the
papers' literal losses) for a list of lambda values and prints, as a Markdown table:

- the paper's fixed rule on the validation split (first gate above 0.5, else the final exit):
  accuracy, expected cost (fraction of the full network's MACs) and MAC speed-up, exit shares;
- the soft expected cost (mean gamma~_1 under the gates) and the soft output's accuracy (the
  paper's inference option 1, every exit run);
- every exit's own accuracy (is any exit left at chance?);
- on the test split, the gates as exit scores with per-exit thresholds fitted on validation for
  a 1-point drop, beside ``max_prob`` fitted the same way on the same network: MAC speed-ups.

    .venv/bin/python benchmarks/lambda_sweep.py
    .venv/bin/python benchmarks/lambda_sweep.py --dataset fashion_mnist --limit 5000 --epochs 4
"""
import argparse
import time

import torch

import eenn
from eenn.outputs import collect_outputs
from eenn.objectives.branching import Branching, soft_cost, soft_output
from eenn.objectives.eenets import EENets, confidence_exit
from eenn.policies import calibrate, report_goal

LITERAL = {"exit_ce": 0.0, "gate_bce": 0.0, "gate_init": "none"}


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def exit_spec(text: str):
    """``"2,5"`` -> stage indices; anything else (``"fine:2"``, ``"all"``) as it is."""
    parts = [p.strip() for p in text.split(",")]
    return [int(p) for p in parts] if all(p.lstrip("-").isdigit() for p in parts) else text


@torch.no_grad()
def validate(net: eenn.MultiExitNetwork, data, version: str) -> dict:
    """The fixed 0.5 rule on ``data.val``; calibrated gate and max_prob rules on ``data.test``."""
    val = collect_outputs(net, data.val)
    test = collect_outputs(net, data.test)
    logits, gates, y = val
    cost = net.cost()
    frac = torch.tensor(cost.fraction)
    ex = confidence_exit(gates, version)  # 0.5 (1/N for EENets v3); branching's rule is the 0.5 one
    dist = torch.bincount(ex, minlength=net.num_exits).double() / len(y)
    hard_cost = float((dist * frac.double()).sum())
    goal = {"max_drop": 0.01}
    fitted = {}
    for policy in ("gate", "max_prob"):
        fitted[policy] = report_goal(calibrate(policy, val, cost, goal), test, cost, goal)
    return {
        "acc": (logits[ex, torch.arange(len(y))].argmax(-1) == y).double().mean().item(),
        "cost": hard_cost,
        "speedup": 1.0 / hard_cost,
        "soft": soft_cost(gates, frac).mean().item(),
        "soft_acc": (soft_output(val).argmax(-1) == y).double().mean().item(),
        "dist": dist.tolist(),
        "exit_acc": (logits.argmax(-1) == y[None]).double().mean(1).tolist(),
        "final": (logits[-1].argmax(-1) == y).double().mean().item(),
        "gate_fit": fitted["gate"],
        "max_prob_fit": fitted["max_prob"],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--backbone", default="resnet20")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--exits", default="2,5", help="stage indices ('2,5') or a distribution ('fine:2')")
    p.add_argument("--branching-lams", default="0,0.1,0.3,0.6,1,2,3")
    p.add_argument("--eenets-lams", default="0,0.1,0.3,0.6,1,2,3")
    p.add_argument("--literal", action="store_true", help="the papers' literal losses (exit_ce=0, gate_bce=0, "
                   "gate_init='none')")
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

    extra = LITERAL if a.literal else {}
    runs = [("branching", lam, "v2", lambda lam: Branching(lam=lam, **extra), "branching")
            for lam in floats(a.branching_lams)]
    runs += [(f"eenets {a.eenets_version}", lam, a.eenets_version,
              lambda lam: EENets(version=a.eenets_version, lam=lam, **extra), "eenets") for lam in floats(a.eenets_lams)]
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
          f"({len(data.train)} train / {len(data.val)} val / {len(data.test)} test), {a.epochs} epochs, SGD lr "
          f"{a.lr}, batch {a.batch_size}, seed {a.seed}, {'literal losses' if a.literal else 'default recipe'}; "
          f"{time.perf_counter() - t0:.0f} s\n")
    print(f"Exits: {', '.join(names)}.\n")
    print("| method | λ | val acc (gate > 0.5) | speed-up (gate > 0.5) | exit shares (gate > 0.5) | soft expected cost "
          "| soft-output acc | exit accuracies | test: gate, fitted (acc, speed-up) | test: max_prob, fitted |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, lam, r in rows:
        dist = " / ".join(f"{100 * v:.0f}%" for v in r["dist"])
        accs = " / ".join(f"{100 * v:.0f}" for v in r["exit_acc"])
        g, m = r["gate_fit"], r["max_prob_fit"]
        print(f"| {label} | {lam:g} | {100 * r['acc']:.2f}% | {r['speedup']:.2f}x | {dist} | {r['soft']:.3f} | "
              f"{100 * r['soft_acc']:.2f}% | {accs} | {100 * g['accuracy']:.2f}%, {g['speedup']:.2f}x | "
              f"{100 * m['accuracy']:.2f}%, {m['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
