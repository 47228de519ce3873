"""What each ``eenn`` subcommand does with its parsed arguments (the parser and the entry point
are in :mod:`eenn.cli`): merge the flags over the config, open runs, and call the library."""
from __future__ import annotations

import json
import os
import sys

def _flag_values(args) -> dict:
    """The dotted-key flags the user gave, as nested dicts ready to merge over a config."""
    out: dict = {}
    goal = {}
    for dest, value in vars(args).items():
        if dest.startswith("goal."):
            goal[dest[5:]] = value
            continue
        if "." not in dest:
            continue
        if isinstance(value, list) and value and isinstance(value[0], tuple):  # -B/-H/-O pairs
            value = dict(value)
        section, key = dest.split(".", 1)
        out.setdefault(section, {})[key] = value
    if goal:
        if "alpha" in goal and "max_drop" not in goal:
            from .config import ConfigError

            raise ConfigError("--alpha guards a --max-drop goal: give --max-drop too")
        out.setdefault("eval", {})["goal"] = goal
    return out


def _values(args, base: dict | None = None) -> dict:
    """The run config as nested dicts: ``base``, then the --config file, the flags and --set."""
    from .config import apply_overrides, merge, read_yaml

    values = dict(base or {})
    if args.config:
        file_values = read_yaml(args.config)
        file_values.pop("methods", None)
        values = merge(values, file_values)
    flags = _flag_values(args)
    values = merge(values, flags)
    if "goal" in flags.get("eval", {}):  # a goal given on the command line replaces the config's
        values["eval"]["goal"] = flags["eval"]["goal"]
    if "batch_sizes" in flags.get("eval", {}) and "timing_samples" not in flags["eval"]:
        values["eval"]["timing_samples"] = None  # sized for the sizes given, not the config's others
    return apply_overrides(values, args.overrides)


def _config(args, base: dict | None = None, values: dict | None = None):
    from .config import check_config, config_from_dict

    return check_config(config_from_dict(_values(args, base) if values is None else values))


def _out_folder(path, flag: str = "--out") -> None:
    """Refuse an output folder that is a file, or lies inside one, before anything runs."""
    from pathlib import Path

    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise ValueError(f"{flag} {path}: {q} is a file, not a folder; give a folder path (the files are "
                                 "written into it)")
            return


def _train(args) -> None:
    from .run import train_run

    config = _config(args)
    if config.train.out_dir:
        _out_folder(config.train.out_dir)
    res = train_run(config, argv=sys.argv[1:] if args._argv is None else args._argv, report=args.report)
    hist = res["history"]
    if os.environ.get("RANK", "0") != "0":
        return
    # the run's epochs, resumed ones included, and how many of them this invocation trained
    notes = [f"{len(hist)} trained now"] if len(hist) != res["epochs"] else []
    notes += ["stopped early"] if res["stopped"] else []
    line = f"done: {res['epochs']} epochs" + (f" ({', '.join(notes)})" if notes else "")
    if hist and "val_acc" in hist[-1]:
        line += f"; validation accuracy per exit (%): {' '.join(f'{100 * a:.2f}' for a in hist[-1]['val_acc'])}"
    print(line)
    if res["report"] is not None:
        _print_table2(res["report"])
    print(f"run directory: {res['dir']}")


def _print_table2(report) -> None:
    print("\n".join(report.table2_header()))
    for row in report.table2_rows():
        print("| " + " | ".join(row) + " |")


def _opened(args):
    """(net, config, run_dir) of the run/checkpoint argument, its config updated by the flags."""
    import dataclasses

    from .config import config_to_dict
    from .run import data_info_of, open_run

    net, config, run_dir = open_run(args.run, model=args.model)
    ckpt = args.run if os.path.isfile(args.run) else next(
        p for p in (os.path.join(args.run, n) for n in ("best.safetensors", "last.safetensors")) if os.path.isfile(p))
    info = data_info_of(ckpt)  # the data set the checkpoint was trained on and its split, where it records them
    recorded = dict(info["split"]) if info and isinstance(info.get("split"), dict) else None
    base = config_to_dict(config) if config is not None else {}
    if config is None and info:  # a checkpoint without its run's config.yaml: the data set it records
        base = {"data": {"name": info["name"], **{k: recorded[k] for k in ("val_fraction", "limit") if k in (recorded or {})}},
                **({"train": {"seed": recorded["seed"]}} if "seed" in (recorded or {}) else {})}
    elif config is not None and recorded is None and (not info or _same_data(info.get("name"), config.data.name)):
        recorded = {"seed": config.train.seed, "val_fraction": config.data.val_fraction}
    values = _values(args, base)
    _drop_other_rules_options(base, values)
    cfg = _config(args, values=values)
    if config is None and "data" not in base and not getattr(args, "config", None) and "data.name" not in vars(args):
        raise ValueError(f"{args.run} does not say which data set it was trained on: give --dataset")
    _check_split(args.run, recorded, (info or {}).get("name") or (config.data.name if config else None), cfg)
    if cfg.train.device:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=_device(args, cfg)))
    return net, cfg, run_dir


def _same_data(a, b) -> bool:
    from .data.datasets import dataset_key

    return a is not None and b is not None and dataset_key(a) == dataset_key(b)


def _check_split(run: str, recorded: dict | None, trained_on: str | None, cfg) -> None:
    """Refuse a validation split other than the one the network was trained beside: another
    seed or val_fraction puts samples it was trained on into the split its thresholds are fitted
    on. (``limit`` only caps each split: the validation samples stay held out.)"""
    from .config import ConfigError

    if not recorded or not _same_data(trained_on, cfg.data.name):
        return
    want = {"seed": cfg.train.seed, "val_fraction": cfg.data.val_fraction}
    was = {k: recorded.get(k, v) for k, v in want.items()}
    if any(was[k] != want[k] for k in want):
        def said(d):
            return f"val_fraction {d['val_fraction']:g}, seed {d['seed']}"

        raise ConfigError(f"{run} was trained beside the validation split of {said(was)}; {said(want)} would fit "
                          "thresholds on samples it was trained on: leave out --val-fraction and --set train.seed "
                          "(the run's own split is used)")


def _drop_other_rules_options(base: dict, values: dict) -> None:
    """A rule named on the command line instead of the run's: the run's policy options were its
    rule's (an ensemble's weights, say), so they are not carried over unless given again."""
    run_eval, ev = base.get("eval") or {}, values.get("eval") or {}
    run_rule, run_opts = run_eval.get("policy"), run_eval.get("policy_options") or {}
    if run_opts and ev.get("policy", run_rule) != run_rule and ev.get("policy_options") == run_opts:
        ev["policy_options"] = {}
        print(f"note: policy {ev['policy']!r} instead of the run's {run_rule!r}: the run's policy options "
              f"({', '.join(run_opts)}) are {run_rule!r}'s and are not carried over", file=sys.stderr)


def _device(args, cfg):
    """The device to evaluate on, checked as `eenn train` checks it (a one-line error when CUDA is
    asked for and absent). The run's own training device, not asked for here, is only used where
    this machine has it."""
    from .devices import usable_device

    try:
        return str(usable_device(cfg.train.device))
    except ValueError:
        asked = "train.device" in vars(args) or any(o.split("=", 1)[0].strip() == "train.device"
                                                    for o in args.overrides)
        if asked:
            raise
        print(f"note: {args.run} was trained on {cfg.train.device!r}, which this machine does not have: evaluating "
              "where the network is (give --device to choose)", file=sys.stderr)
        return None


def _evaluate(args) -> None:
    from .run import build_data, evaluate_run

    if args.out:  # the report is a folder (report.md, report.json, curve.png)
        _out_folder(args.out)
    net, cfg, run_dir = _opened(args)
    report = evaluate_run(net, build_data(cfg), cfg, args.out or run_dir)
    print(report.to_markdown())
    print(f"report: {args.out or run_dir}/report.md")


def _calibrate(args) -> None:
    from .outputs import collect_outputs
    from .exporter import calibration_record
    from .io import writable_text_file, write_json
    from .policies import ExitPolicy, report_goal
    from .run import build_data

    if args.out:
        writable_text_file(args.out, "a calibration")
        folder = os.path.dirname(args.out) or "."
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--out {args.out}: there is no folder {folder}; create it or give a path in a "
                                    "folder that exists")
    net, cfg, run_dir = _opened(args)
    data = build_data(cfg)
    e = cfg.eval
    net.eval()
    if cfg.train.device:
        net.to(cfg.train.device)
    # The record `eenn export --calibration` and `eenn predict` read, plus the test-split figures.
    record = calibration_record(net, data.val, ExitPolicy(e.policy, fallback=e.fallback, **e.policy_options), e.goal)
    fitted = ExitPolicy.from_dict(record)
    test = collect_outputs(net, data.test)
    on_test = report_goal(fitted, test, net.cost(), e.goal)
    record.update(test=on_test)
    out = args.out or os.path.join(run_dir, "calibration.json")
    write_json(record, out)
    v = record["validation"]
    print(f"{e.policy} thresholds (validation, goal {e.goal}): {', '.join(f'{t:.4g}' for t in fitted.thresholds.tolist())}")
    print(f"validation: accuracy {100 * v['accuracy']:.2f}%, exits {', '.join(f'{100 * p:.1f}%' for p in v['exit_distribution'])}")
    print(f"test:       accuracy {100 * on_test['accuracy']:.2f}% (final exit {100 * on_test['final_accuracy']:.2f}%), "
          f"MAC speed-up {on_test['speedup']:.2f}x, goal held: {'yes' if on_test['goal_held'] else 'NO'}")
    print(f"written: {out}")


def _predict(args) -> int:
    import numpy as np
    import torch

    from .checkpoint import read_description
    from .engine import DynamicEngine
    from .policies import ExitPolicy
    from .run import open_run
    from .serve.inputs import InputError, decode_body

    if args.calibration and not os.path.isfile(args.calibration):
        raise FileNotFoundError(f"--calibration {args.calibration}: no such file (write one with `eenn calibrate "
                                f"{args.run}`)")
    net, config, run_dir = open_run(args.run, model=args.model)
    # the policy: --calibration, the run's calibration.json, one saved in the checkpoint, the report's:
    # the first that holds one (a damaged one is refused for what is wrong with it)
    ckpt = args.run if os.path.isfile(args.run) else os.path.join(run_dir, "best.safetensors")
    default = os.path.join(run_dir, "calibration.json")
    candidates = [args.calibration] if args.calibration else [default, ckpt, os.path.join(run_dir, "report.json")]
    policy = None
    for path in candidates:
        if not os.path.isfile(path) or (path == ckpt and "policy" not in read_description(path)):
            continue
        if path != ckpt:
            redo = f"`eenn calibrate {args.run}" + (f" --out {path}`" if path != default else "`")
            if not args.calibration and path.endswith("report.json"):  # the report's thresholds
                redo = f"`eenn evaluate {args.run}` (or `eenn calibrate {args.run}`, whose record predict reads first)"
            _check_fitted_on(path, net, redo)
        try:
            policy = ExitPolicy.load(path)
        except ValueError as e:  # damaged: said as such, naming the file
            raise ValueError(str(e) if path in str(e) else f"{path}: {e}") from None
        break
    if policy is None:
        raise ValueError(f"no thresholds for {args.run}: run `eenn calibrate {args.run}` first or give --calibration")
    spec = net.input_spec  # older checkpoints: eenn.load reads it from their extra data
    names = spec.class_names if spec is not None else None
    manifest = {"input_shape": list(net.input_shape),
                "preprocess": {"mean": list(spec.mean), "std": list(spec.std)}
                if spec is not None and spec.kind == "pixels" else None}
    if net.takes_token_ids:  # the bodies are read as the server reads them: integer arrays of token ids
        manifest["input_dtype"] = str(net.backbone.input_dtype).removeprefix("torch.")
    engine = DynamicEngine(net.eval(), policy)
    types = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".npy": "application/x-npy",
             ".json": "application/json"}
    failed = 0
    for path in args.inputs:
        ext = os.path.splitext(path)[1].lower()
        try:
            if ext not in types:
                raise InputError(415, f"unsupported file type {ext or '(none)'}: give .png, .jpg, .npy or .json")
            with open(path, "rb") as f:
                x = torch.from_numpy(np.ascontiguousarray(decode_body(f.read(), types[ext], manifest, max_batch=4096)))
        except (InputError, OSError) as err:
            print(f"eenn: error: {path}: {getattr(err, 'message', None) or err}", file=sys.stderr)
            failed += 1
            continue
        x = x if net.takes_token_ids else x.float()
        with torch.no_grad():
            res = engine(x)
            out = net(x, exits=None)
            # the rule's answering probabilities (an ensemble's for ensemble rules), as the server answers
            probs = engine.bound.probs(engine.bound.scores(out.logits, out.gates), out.logits)
        for i in range(len(x)):
            k, c = int(res.exit[i]), int(res.prediction[i])
            rec = {"input": path if len(x) == 1 else f"{path}[{i}]", "prediction": c,
                   "class": names[c] if names and c < len(names) else str(c), "exit": k,
                   "exit_name": net.exit_names[k], "confidence": float(probs[k, i, c]), "macs": int(res.macs[i])}
            if args.json:
                print(json.dumps(rec))
            else:
                print(f"{rec['input']}: {rec['class']} (class {c}), exit {k} ({rec['exit_name']}), "
                      f"confidence {rec['confidence']:.3f}, {rec['macs']:,} MACs")
    return 1 if failed else 0


def _check_fitted_on(path: str, net, redo: str) -> None:
    """Refuse a calibration record (or a report) fitted on other weights than ``net``'s (the run
    was trained again since, or it is another checkpoint's): its thresholds do not hold for these;
    ``redo`` says which command fits them again. Records that do not name their weights (older
    ones) are taken as they are."""
    from .checkpoint import weights_digest
    from .io import read_json

    try:
        record = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # not a record: reading its policy says so
    fitted_on = record.get("weights_sha256") if isinstance(record, dict) else None
    if fitted_on is not None and fitted_on != weights_digest(net):
        raise ValueError(f"{path} was calibrated on other weights than these (trained again since?): re-run "
                         f"{redo}")


def _compare(args) -> int:
    from .compare import compare

    if args.out:
        _out_folder(args.out)
    res = compare(args.config, overrides=args.overrides, only=args.methods, out=args.out,
                  argv=sys.argv[1:] if args._argv is None else args._argv, retrain=args.retrain)
    print(res.markdown())
    print(f"written: {res['dir']}/compare.md, compare.json, curves.png")
    if res["failed"]:
        print(f"eenn: error: {len(res['failed'])} method(s) failed, the tables hold the others: "
              + "; ".join(f"{k}: {v}" for k, v in res["failed"].items()), file=sys.stderr)
        return 1
    return 0
