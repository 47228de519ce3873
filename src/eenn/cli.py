"""The ``eenn`` command. Only entry points parse the command line (STYLE.md habit 9)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

from .export_cli import MODEL_HELP

EPILOG_TRAIN = """examples:
  eenn train --dataset fashion_mnist --backbone resnet20 --exits linear:3 --objective joint --epochs 10 --out runs/r20
  eenn train --config configs/fmnist_resnet18.yaml --set train.epochs=3 --set model.backbone_options.width=0.5
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


def _labels(text: str) -> list[str]:
    labels = [x.strip() for x in text.split(",") if x.strip()]
    if not labels:
        raise argparse.ArgumentTypeError(f"expected one or more method labels separated by commas, got {text!r}")
    return labels


def _exits(text: str):
    """``--exits`` as ``model.exits`` reads it (:func:`eenn.config.parse_exits`): ``all``, ``none``,
    ``<distribution>:<n>``, or a comma-separated list of stage indices or names; a malformed one
    is a usage error."""
    from .config import ConfigError, parse_exits

    try:
        return parse_exits(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
            g.add_argument(flag, dest=f"train.{f.name}", action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=f"default: {f.default}")
        else:
            g.add_argument(flag, dest=f"train.{f.name}", type=base, default=argparse.SUPPRESS,
                           metavar=f.name.upper(), help=f"default: {f.default}")


EPILOG_EVALUATE = """examples:
  eenn evaluate runs/r20                                # best checkpoint, the run's data and eval settings
  eenn evaluate runs/r20 --policy entropy --max-drop 0.005 --out runs/r20/entropy
  eenn evaluate runs/r20/best.safetensors --dataset fashion_mnist --batch-sizes 1,256 --repeats 7
  eenn evaluate runs/r20 --deployments eager            # time PyTorch eager only (quick)

Writes report.json, report.md, curve.png and exits.png to --out (default: the run directory).
"""

EPILOG_CALIBRATE = """examples:
  eenn calibrate runs/r20 --policy max_prob --max-drop 0.01
  eenn calibrate runs/r20 --policy entropy --budget 2e6
  eenn calibrate runs/r20 --max-drop 0.01 --alpha 0.05     # guarded: holds with 95% confidence

Fits per-exit thresholds on the validation split, reports the goal on the test split and writes
calibration.json (which `eenn predict` and `eenn export --calibration` read).
"""

EPILOG_PREDICT = """examples:
  eenn predict runs/r20 shirt.png boot.jpg
  eenn predict runs/r20 batch.npy --json

Inputs: PNG/JPEG images (converted to the model's channels and size), .npy arrays (uint8 pixels,
or float inputs already normalised; one sample or a batch), .json nested lists. The exit policy
comes from --calibration, else <run>/calibration.json, else one saved in the checkpoint
(eenn.save(..., policy=)), else the run's report.json.
"""

EPILOG_COMPARE = """examples:
  eenn compare --config configs/fmnist_resnet18.yaml
  eenn compare --config configs/fmnist_resnet18.yaml --methods Baseline,B-NET --set train.epochs=1 --out runs/quick

Each method trains into <out>/<method> (resuming when re-run; finished runs are reused), then
compare.md (Table 1, Table 2, pruning), compare.json and curves.png go to <out>.
"""


def _kv(flag: str):
    def parse(text: str):
        key, sep, val = text.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{flag} takes KEY=VALUE, got {text!r}")
        return key, _value(val)
    return parse


def _add_run_flags(p: argparse.ArgumentParser, *, model: bool = True, train: bool = True, report: bool = True) -> None:
    """The flags that set keys of a RunConfig; given flags override the --config file. ``report``:
    also the flags of the evaluation report (split, timing, curve), which calibrate does not make."""
    S = argparse.SUPPRESS
    p.add_argument("--config", help="YAML run config (sections data, model, objective, train, eval)")
    p.add_argument("-s", "--set", action="append", dest="overrides", metavar="KEY=VALUE", default=[],
                   help="override any config key, e.g. train.epochs=3 or model.backbone_options={width: 0.5}")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", dest="data.name", default=S, help="registered data set (eenn list datasets)")
    g.add_argument("--data-dir", dest="data.data_dir", default=S)
    g.add_argument("--download", dest="data.download", action=argparse.BooleanOptionalAction, default=S)
    g.add_argument("--val-fraction", dest="data.val_fraction", type=float, default=S)
    g.add_argument("--limit", dest="data.limit", type=int, default=S, help="cap every split at this many samples")
    if model:
        g = p.add_argument_group("model and objective")
        g.add_argument("--backbone", dest="model.backbone", default=S)
        g.add_argument("-B", "--backbone-option", dest="model.backbone_options", action="append", type=_kv("-B"),
                       metavar="KEY=VALUE", default=S, help="e.g. width=0.5")
        g.add_argument("--exits", dest="model.exits", type=_exits, default=S,
                       help="'all', 'none', stages by index or name ('1,3', 'block2.0,block3.0'), or a distribution 'linear:3'")
        g.add_argument("--head", dest="model.head", default=S)
        g.add_argument("-H", "--head-option", dest="model.head_options", action="append", type=_kv("-H"),
                       metavar="KEY=VALUE", default=S, help="e.g. width=64")
        g.add_argument("--objective", dest="objective.name", default=S)
        g.add_argument("-O", "--objective-option", dest="objective.options", action="append", type=_kv("-O"),
                       metavar="KEY=VALUE", default=S, help="e.g. weights=sdn")
    _add_eval_flags(p, report=report)
    if train:
        _add_train_config(p)
    else:
        p.add_argument("--device", dest="train.device", default=S, help="cpu, cuda, cuda:1")


def _add_eval_flags(p: argparse.ArgumentParser, *, report: bool = True) -> None:
    S = argparse.SUPPRESS
    g = p.add_argument_group("exit policy and report" if report else "exit policy")
    g.add_argument("--policy", dest="eval.policy", default=S, help="exit rule (eenn list policies)")
    goal = g.add_mutually_exclusive_group()
    goal.add_argument("--max-drop", dest="goal.max_drop", type=float, default=S,
                      help="goal: the largest saving within this accuracy drop (0.01 = 1 point)")
    goal.add_argument("--budget", dest="goal.budget", type=float, default=S, help="goal: the best accuracy within these MACs per sample")
    goal.add_argument("--msdnet-q", dest="goal.msdnet_q", type=float, default=S, help="goal: MSDNet's exit distribution p_k ~ q^k")
    g.add_argument("--alpha", dest="goal.alpha", type=float, default=S, help="with --max-drop: guarantee it with confidence 1-alpha")
    g.add_argument("--fallback", dest="eval.fallback", choices=("final", "most_confident"), default=S)
    if not report:
        return
    g.add_argument("--split", dest="eval.split", choices=("val", "test", "train"), default=S)
    g.add_argument("--batch-sizes", dest="eval.batch_sizes", type=_ints, default=S, help="timed batch sizes, e.g. 1,256 ('' skips timing)")
    g.add_argument("--timing-samples", dest="eval.timing_samples", type=_ints, default=S, help="samples timed per batch size, e.g. 256,2048 (default: at least 256 and 8 batches of each size)")
    g.add_argument("--repeats", dest="eval.repeats", type=int, default=S)
    g.add_argument("--curve-points", dest="eval.curve_points", type=int, default=S)
    g.add_argument("--deployments", dest="eval.deployments", choices=("all", "eager"), default=S,
                   help="paths timed: every one this machine offers (PyTorch eager and optimised, onnxruntime; the "
                        "speed-up is over the fastest static one) or PyTorch eager only (default: all)")


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (and exit status 2), pointing at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="eenn", description="Early-exit neural networks for PyTorch.",
                                epilog="`eenn COMMAND --help` shows each command's options and examples.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser(
        "demo", help="train a multi-exit network on the embedded digits data, calibrate, report",
        description="Train a multi-exit network on scikit-learn's digits (no download), print per-exit test "
        "accuracy and MACs, fit max_prob thresholds on validation, and print the test-split Table-2 line "
        "with the oracle; the report and plots go to --out.",
        epilog="example: eenn demo --backbone resnet20 --epochs 30", formatter_class=raw)
    d.add_argument("--backbone", default="resnet20", help="registered backbone (default: resnet20)")
    d.add_argument("--exits", default="all", type=_exits, help="'all', 'none', stages by index or name ('1,3', 'block2.0'), or a distribution 'fine:2'")
    d.add_argument("--epochs", type=int, default=30)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    d.add_argument("--out", default="runs/demo", help="where the report and plots go (default: runs/demo)")

    t = sub.add_parser("train", help="train a multi-exit network, then write its evaluation report",
                       description="Train a multi-exit network with one objective. The run directory (--out) "
                       "gets config.yaml, run.json (command, versions), metrics.jsonl, last/best.safetensors "
                       "and the report (report.md/json, curve.png, exits.png); re-running resumes.",
                       epilog=EPILOG_TRAIN, formatter_class=raw)
    _add_run_flags(t)
    t.add_argument("--no-report", dest="report", action="store_false", help="skip the evaluation report")

    e = sub.add_parser("evaluate", help="the evaluation report of a trained network", description=
                       "Calibrate on validation, then report on a split: per-exit accuracy, exit distribution, "
                       "MACs, measured speed-up of the dynamic engine, accuracy-MACs curve with the oracle.",
                       epilog=EPILOG_EVALUATE, formatter_class=raw)
    e.add_argument("run", help="a run directory or a checkpoint file")
    e.add_argument("--model", default=None, metavar="MODULE:FUNCTION", help=MODEL_HELP)
    e.add_argument("--out", help="report directory (default: the run directory)")
    _add_run_flags(e, model=False, train=False)

    c = sub.add_parser("calibrate", help="fit per-exit thresholds on validation to a goal",
                       description="Fit the policy's per-exit thresholds on the validation split to a goal and "
                       "report how the goal holds on the test split.", epilog=EPILOG_CALIBRATE, formatter_class=raw)
    c.add_argument("run", help="a run directory or a checkpoint file")
    c.add_argument("--model", default=None, metavar="MODULE:FUNCTION", help=MODEL_HELP)
    c.add_argument("--out", help="calibration file (default: <run>/calibration.json)")
    _add_run_flags(c, model=False, train=False, report=False)

    r = sub.add_parser("predict", help="predict the class of images or arrays, with the exit taken",
                       description="Run the dynamic engine on input files: prediction, exit, confidence.",
                       epilog=EPILOG_PREDICT, formatter_class=raw)
    r.add_argument("run", help="a run directory or a checkpoint file")
    r.add_argument("--model", default=None, metavar="MODULE:FUNCTION", help=MODEL_HELP)
    r.add_argument("inputs", nargs="+", help="image (.png, .jpg), .npy or .json files")
    r.add_argument("--calibration", help="calibration.json from `eenn calibrate`")
    r.add_argument("--json", action="store_true", help="one JSON object per input on stdout")

    m = sub.add_parser("compare", help="several methods on one backbone and data set, side by side",
                       description="Train and report every method of a compare file (a run config plus "
                       "'methods:'); write Table 1, Table 2 and one accuracy-MACs figure.",
                       epilog=EPILOG_COMPARE, formatter_class=raw)
    m.add_argument("--config", required=True, help="compare YAML file")
    m.add_argument("--methods", type=_labels, help="only these methods (comma-separated labels)")
    m.add_argument("-s", "--set", action="append", dest="overrides", default=[], metavar="KEY=VALUE",
                   help="override a base key for every method, e.g. train.epochs=1")
    m.add_argument("--out", help="output directory (default: the file's train.out_dir)")
    m.add_argument("--retrain", action="store_true", help="re-run methods whose runs are finished")

    l = sub.add_parser("list", help="list registered backbones, heads, objectives, policies and datasets",
                       epilog="examples:\n  eenn list\n  eenn list backbones", formatter_class=raw)
    l.add_argument("what", nargs="?", choices=["backbones", "heads", "objectives", "policies", "datasets"], default=None)

    from .search.cli import add_parser as add_search
    from .serve.cli import add_parsers

    add_search(sub)
    add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed on one line)
        return int(e.code or 0)
    args._argv = argv
    if args.command is None:
        parser.print_help()
        return 2
    try:
        from . import commands
        from .inference import tune_cpu_allocator

        tune_cpu_allocator()  # large activations are not handed back to the kernel after every layer
        if args.command == "demo":
            from .demo import run_demo

            run_demo(backbone=args.backbone, exits=args.exits, epochs=args.epochs, seed=args.seed,
                     device=args.device, out=args.out)
        elif args.command == "train":
            commands._train(args)
        elif args.command == "evaluate":
            commands._evaluate(args)
        elif args.command == "calibrate":
            commands._calibrate(args)
        elif args.command == "predict":
            return commands._predict(args)
        elif args.command == "compare":
            return commands._compare(args)
        elif args.command == "list":
            from . import data, list_backbones, list_heads, list_objectives, policies

            lists = {"backbones": list_backbones(), "heads": list_heads(), "objectives": list_objectives(),
                     "policies": policies.list_policies(), "datasets": data.list_datasets()}
            for name, items in lists.items():
                if args.what in (None, name):
                    print(f"{name}: {', '.join(items)}")
        elif args.command == "search":
            from .search.cli import run as run_search

            commands._out_folder(args.out)
            return run_search(args)
        elif hasattr(args, "run") and callable(args.run):
            return args.run(args)
    except ConfigError as e:
        # Under torchrun every rank reads the same settings and fails the same way: rank 0 says it.
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("RANK", "0") == "0":
            print(f"eenn: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, FileNotFoundError, OSError, RuntimeError, FloatingPointError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else getattr(e, "summary", e)
        print(f"eenn: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resumable = args.command in ("train", "compare", "search")
        print("eenn: interrupted" + ("; re-run the same command to resume from the last checkpoint" if resumable
                                      else ""), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
