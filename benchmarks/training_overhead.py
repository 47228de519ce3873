"""Training overhead of early exits: wall-clock of one epoch of `joint` on a multi-exit network
divided by one epoch of `final` on the same backbone and data, measured in one run.

    .venv/bin/python benchmarks/training_overhead.py [--dataset fashion_mnist] [--limit 6000]
    .venv/bin/python benchmarks/training_overhead.py --backbone vit -B dim=256 --exits all

Each configuration trains a fresh network for `--epochs` epochs per objective, alternating
`final` and `joint` over `--repeats` rounds; the first epoch of every fit is a warm-up and is
not counted; the ratio is of medians. Target: <= 1.2x.
"""
import argparse
import statistics

import torch
import yaml

import eenn


def epoch_times(objective, data, args, exits):
    torch.manual_seed(0)
    net = eenn.create_network(args.backbone, in_channels=data.info.in_channels, num_classes=data.info.num_classes,
                              input_size=data.info.input_size, exits=exits, head=args.head, **args.options)
    hist = eenn.fit(net, data, objective, epochs=args.epochs, batch_size=args.batch_size, lr=0.05,
                    progress=False, device=args.device)
    return [h["epoch_time"] for h in hist[1:]]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--limit", type=int, default=6000, help="training samples per epoch (0: all)")
    p.add_argument("--backbone", default="resnet20")
    p.add_argument("--head", default="linear")
    p.add_argument("-B", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="a backbone option (repeatable), e.g. -B dim=256 for the ViT")
    p.add_argument("--exits", nargs="+", default=["linear:3", "all"], help="exit placements to measure")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    try:
        args.options = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in args.options)}
    except yaml.YAMLError as e:
        raise SystemExit(f"-B: not KEY=VALUE with a YAML value: {e}")
    data = eenn.load_dataset(args.dataset, limit=args.limit or None, val_fraction=0.0)
    print(f"{args.backbone} {args.options or ''} on {args.dataset} ({len(data.train)} samples/epoch, batch {args.batch_size}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device or 'auto'}")
    for exits in args.exits:
        t = {"final": [], "joint": []}
        for _ in range(args.repeats):
            for obj in ("final", "joint"):
                t[obj] += epoch_times(obj, data, args, exits)
        net = eenn.create_network(args.backbone, in_channels=data.info.in_channels, num_classes=10,
                                  input_size=data.info.input_size, exits=exits, head=args.head, **args.options)
        cost = net.cost()
        f, j = statistics.median(t["final"]), statistics.median(t["joint"])
        print(f"exits={exits:10s} ({net.num_exits - 1} heads, +{100 * (cost.total_params / cost.params[-1] - 1):.1f}% params, "
              f"+{100 * (cost.dynamic_macs[-1] / cost.macs[-1] - 1):.2f}% MACs)  "
              f"epoch final {f:.2f}s  joint {j:.2f}s  ratio joint/final = {j / f:.3f}x")


if __name__ == "__main__":
    main()
