"""The ``eenn`` command. Only entry points parse the command line (STYLE.md habit 9)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

EPILOG_TRAIN = """examples:
  eenn train --dataset fashion_mnist --backbone resnet20 --exits linear:3 --objective joint --epochs 10 --out runs/r20
  eenn train --dataset digits --objective joint -O weights=sdn --lr 0.1 --out runs/sdn
  eenn train --dataset fashion_mnist --objective heads_only -O checkpoint=runs/final/best.safetensors --out runs/ic
  torchrun --nproc_per_node=2 -m eenn train --dataset fashion_mnist --out runs/ddp   # DistributedDataParallel
"""


def _value(text: str):
    """A command-line value: JSON when it parses (numbers, lists, true/false), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _options(pairs: list[str] | None, flag: str) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, val = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {pair!r}")
        out[key] = _value(val)
    return out


def _exits(text: str):
    parts = text.split(",")
    return [int(s) for s in parts] if all(s.strip().lstrip("-").isdigit() for s in parts) else text


def _add_train_config(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, so the command and the dataclass cannot drift apart."""
    from .trainer import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    g = p.add_argument_group("training (TrainConfig)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "out_dir":
            flag = "--out"
        hint = hints[f.name]
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        if base is bool:
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            g.add_argument(flag, dest=f.name, type=base, default=f.default, metavar=f.name.upper(),
                           help=f"default: {f.default}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eenn", description="Early-exit neural networks for PyTorch.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser(
        "demo",
        help="train a multi-exit network on the embedded digits data and print per-exit accuracy and MACs",
        description="Train a multi-exit network on scikit-learn's digits (no download) and print "
        "per-exit test accuracy and MACs.",
        epilog="example: eenn demo --backbone resnet20 --epochs 30",
    )
    d.add_argument("--backbone", default="resnet20", help="registered backbone (default: resnet20)")
    d.add_argument("--exits", default="all", help="'all', 'none', stage indices '1,3', or a distribution 'fine:2'")
    d.add_argument("--epochs", type=int, default=30)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    d.add_argument("--out", default="runs/demo", help="where the report and plots go (default: runs/demo)")

    t = sub.add_parser("train", help="train a multi-exit network with one objective",
                       description="Train a multi-exit network; writes metrics.jsonl, last.safetensors "
                       "and best.safetensors to --out and resumes from there when re-run.",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--dataset", default="digits")
    t.add_argument("--data-dir", default=None)
    t.add_argument("--download", action="store_true", help="fetch the data set if it is not found")
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument("--limit", type=int, default=None, help="cap every split at this many samples")
    t.add_argument("--backbone", default="resnet20")
    t.add_argument("-B", "--backbone-option", action="append", metavar="KEY=VALUE", help="e.g. width=0.5")
    t.add_argument("--exits", default="all")
    t.add_argument("--head", default="linear")
    t.add_argument("-H", "--head-option", action="append", metavar="KEY=VALUE", help="e.g. width=64")
    t.add_argument("--objective", default="joint")
    t.add_argument("-O", "--objective-option", action="append", metavar="KEY=VALUE", help="e.g. weights=sdn")
    _add_train_config(t)

    l = sub.add_parser("list", help="list registered backbones, heads, objectives, policies and datasets")
    l.add_argument("what", nargs="?", choices=["backbones", "heads", "objectives", "policies", "datasets"], default=None)
    return p


def _train(args) -> None:
    from . import create_network, create_objective, load_dataset
    from .trainer import TrainConfig, Trainer

    data = load_dataset(args.dataset, data_dir=args.data_dir, download=args.download,
                        val_fraction=args.val_fraction, seed=args.seed, limit=args.limit)
    info = data.info
    net = create_network(args.backbone, in_channels=info.in_channels, num_classes=info.num_classes,
                         input_size=info.input_size, exits=_exits(args.exits), head=args.head,
                         head_options=_options(args.head_option, "--head-option"),
                         **_options(args.backbone_option, "--backbone-option"))
    objective = create_objective(args.objective, **_options(args.objective_option, "--objective-option"))
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    hist = Trainer(config).fit(net, objective, data)
    if hist and "val_acc" in hist[-1] and os.environ.get("RANK", "0") == "0":
        accs = " ".join(f"{100 * a:.2f}" for a in hist[-1]["val_acc"])
        print(f"done: {len(hist)} epochs; validation accuracy per exit (%): {accs}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(backbone=args.backbone, exits=_exits(args.exits), epochs=args.epochs, seed=args.seed, device=args.device,
                     out=args.out)
        elif args.command == "train":
            _train(args)
        elif args.command == "list":
            from . import data, list_backbones, list_heads, list_objectives, policies

            lists = {"backbones": list_backbones(), "heads": list_heads(), "objectives": list_objectives(),
                     "policies": policies.list_policies(), "datasets": data.list_datasets()}
            for name, items in lists.items():
                if args.what in (None, name):
                    print(f"{name}: {', '.join(items)}")
    except (ValueError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"eenn: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("eenn: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
