"""``eenn search``: the command-line entry point of the design search. ``eenn.cli`` registers it
with :func:`add_parser` and calls :func:`run`; ``python -m eenn.search.cli`` runs it alone."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parser", "build_parser", "main", "run"]

EPILOG = """examples:
  eenn search --config configs/search_digits.yaml --out runs/search-digits
  eenn search --config configs/search_digits.yaml --out runs/search-digits --trials 24   # continue: 24 in all
  eenn search --config configs/search_fashion_mnist.yaml --workers 2 --out runs/search-fm
  eenn search --config my_space.yaml --storage postgresql://user@host/db --study shared   # workers on many machines
  eenn search --config configs/search_digits.yaml --floor 0.95 --ceiling 300000 --report-only

The study lives in --storage (default: sqlite:///OUT/study.db): re-running the same command after a
kill continues it. Writes OUT/pareto.md, OUT/pareto.json, OUT/pareto.png and OUT/designs/*.yaml
(run configs: `eenn train --config DESIGN.yaml` retrains a design). Exit codes: 0 admissible designs found;
1 none admissible (the report says why); 2 bad configuration, or constraints no design of the
space can meet.
"""


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", required=True, metavar="FILE", help="search config (YAML): dataset, space, constraints, "
                   "objective, policy, train, retrain, search")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage: an RDB URL such as sqlite:///study.db or postgresql://...; 'memory' for a "
                   "throw-away study (default: sqlite:///OUT/study.db)")
    p.add_argument("--study", default=None, metavar="NAME", help="study name (default: the config's name)")
    p.add_argument("--trials", type=int, default=None, metavar="N",
                   help="trained trials the study should hold in all, earlier runs included (designs pruned before "
                   "training and repeats of a measured design are free; default: the config's)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="local worker processes on one study (default 1)")
    p.add_argument("--out", default="search-out", metavar="DIR", help="report folder (default: search-out)")
    p.add_argument("--sampler", default=None, choices=["nsga2", "tpe", "gp", "random"], help="override search.sampler")
    p.add_argument("--seed", type=int, default=None, help="override search.seed")
    p.add_argument("--floor", type=float, default=None, metavar="ACC", help="override constraints.accuracy_floor (0-1)")
    p.add_argument("--ceiling", type=float, default=None, metavar="MACS", help="override constraints.macs_ceiling")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when present)")
    p.add_argument("--report-only", action="store_true", help="train nothing: write the report of the study as it is")
    p.add_argument("--quiet", action="store_true", help="no per-trial progress lines")
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``search`` subcommand on ``subparsers`` (from ``add_subparsers``)."""
    p = subparsers.add_parser(
        "search", help="design search under an accuracy floor and a MAC ceiling (NACHOS, Optuna)",
        description="Search backbone and exits together: multi-objective (validation accuracy after calibration, "
        "expected MACs) under an accuracy floor and a MAC ceiling given to Optuna as constraints.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    return _configure(p)


def build_parser() -> argparse.ArgumentParser:
    return _configure(argparse.ArgumentParser(prog="eenn search", epilog=EPILOG,
                                              formatter_class=argparse.RawDescriptionHelpFormatter))


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit code (errors are printed to stderr)."""
    from .config import load_config
    from .space import ConfigError

    try:
        config = load_config(args.config)
        changes = {k: v for k, v in (("accuracy_floor", args.floor), ("macs_ceiling", args.ceiling),
                                     ("sampler", args.sampler), ("seed", args.seed)) if v is not None}
        if changes:
            config = config.replace(**changes)
        if args.report_only:
            return _report_only(config, args)
        from .study import run_search

        result = run_search(config, storage=args.storage, study_name=args.study, n_trials=args.trials,
                            workers=args.workers, out=args.out, device=args.device, progress=not args.quiet)
    except (ConfigError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"eenn search: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eenn search: interrupted; re-run the same command to continue the study", file=sys.stderr)
        return 130
    _print_result(result.front, result.message, result.files)
    return 0 if result.front else 1


def _report_only(config, args) -> int:
    import optuna

    from .report import summarise, write_report
    from .study import _storage, default_storage

    url = args.storage or default_storage(args.out)
    name = args.study or config.name
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
            raise KeyError(name)  # no study to report (and no empty database left behind)
        study = optuna.load_study(study_name=name, storage=_storage(url, args.out, None))
    except KeyError:
        print(f"eenn search: error: no study {name!r} in {url}", file=sys.stderr)
        return 2
    records, front, message = summarise(study, config)
    files = write_report(args.out, study, config, records, front, message, study_name=name, storage=url)
    _print_result(front, message, files)
    return 0 if front else 1


def _print_result(front, message: str, files: dict) -> None:
    print(f"\n{message}")
    if front:
        print(f"{'trial':>5}  {'val acc':>8}  {'val MACs':>10}  {'test acc':>8}  {'test MACs':>10}")
        for r in front:
            ta = f"{100 * r['test_accuracy']:.2f}%" if r.get("test_accuracy") is not None else "-"
            tm = f"{r['test_macs']:,.0f}" if r.get("test_macs") is not None else "-"
            print(f"{r['number']:>5}  {100 * r['val_accuracy']:7.2f}%  {r['val_macs']:>10,.0f}  {ta:>8}  {tm:>10}")
    if files:
        print(f"report: {files['markdown']}, {files['json']}, {files['plot']}; design configs in {files['designs']}/")


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
