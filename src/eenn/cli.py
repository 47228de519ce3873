"""The ``eenn`` command. Only entry points parse the command line (STYLE.md habit 9)."""
from __future__ import annotations

import argparse
import sys


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
    l = sub.add_parser("list", help="list registered backbones, heads and datasets")
    l.add_argument("what", nargs="?", choices=["backbones", "heads", "datasets"], default=None)
    return p


def _exits(text: str):
    parts = text.split(",")
    return [int(s) for s in parts] if all(s.strip().lstrip("-").isdigit() for s in parts) else text


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(backbone=args.backbone, exits=_exits(args.exits), epochs=args.epochs, seed=args.seed, device=args.device)
        elif args.command == "list":
            from . import data, list_backbones, list_heads

            lists = {"backbones": list_backbones(), "heads": list_heads(), "datasets": data.list_datasets()}
            for name, items in lists.items():
                if args.what in (None, name):
                    print(f"{name}: {', '.join(items)}")
    except (ValueError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"eenn: error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
