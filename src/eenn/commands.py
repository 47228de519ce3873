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
            raise ValueError("--alpha guards a --max-drop goal: give --max-drop too")
        out.setdefault("eval", {})["goal"] = goal
    return out


def _config(args, base: dict | None = None):
    from .config import apply_overrides, check_config, config_from_dict, merge, read_yaml

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
    values = apply_overrides(values, args.overrides)
    return check_config(config_from_dict(values))


def _train(args) -> None:
    from .run import train_run

    config = _config(args)
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
    print("| Architecture | Test acc. | Inf. time (batch 1) | Speed-up | Exits |")
    print("|---|---|---|---|---|")
    for row in report.table2_rows():
        print("| " + " | ".join(row) + " |")


def _opened(args):
    """(net, config, run_dir) of the run/checkpoint argument, its config updated by the flags."""
    from .config import config_to_dict
    from .run import data_info_of, open_run

    net, config, run_dir = open_run(args.run, model=args.model)
    base = config_to_dict(config) if config is not None else {}
    if config is None:  # a bare checkpoint: the data set it was trained on, when it says
        ckpt = args.run if os.path.isfile(args.run) else None
        info = data_info_of(ckpt) if ckpt else None
        if info:  # and, where it records it, how it was split (its validation samples are the right ones)
            split = info.get("split") or {}
            base = {"data": {"name": info["name"], **{k: split[k] for k in ("val_fraction", "limit") if k in split}},
                    **({"train": {"seed": split["seed"]}} if "seed" in split else {})}
    cfg = _config(args, base)
    if config is None and "data" not in base and not getattr(args, "config", None) and "data.name" not in vars(args):
        raise ValueError(f"{args.run} does not say which data set it was trained on: give --dataset")
    return net, cfg, run_dir


def _evaluate(args) -> None:
    from .run import build_data, evaluate_run

    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file: the report is a folder (report.md, report.json, curve.png); "
                         "give a folder")
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
    net, cfg, run_dir = _opened(args)
    data = build_data(cfg)
    e = cfg.eval
    net.eval()
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
            _check_fitted_on(path, net, f"eenn calibrate {args.run}" + (f" --out {path}" if path != default else ""))
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
        with torch.no_grad():
            res = engine(x.float())
            out = net(x.float(), exits=None)
        probs = torch.softmax(out.logits.float(), -1)
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


def _check_fitted_on(path: str, net, calibrate: str) -> None:
    """Refuse a calibration record fitted on other weights than ``net``'s (the run was trained
    again since, or it is another checkpoint's): its thresholds do not hold for these. Records
    that do not name their weights (older ones) are taken as they are."""
    from .checkpoint import weights_digest
    from .io import read_json

    try:
        record = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # not a record: reading its policy says so
    fitted_on = record.get("weights_sha256") if isinstance(record, dict) else None
    if fitted_on is not None and fitted_on != weights_digest(net):
        raise ValueError(f"{path} was calibrated on other weights than these (trained again since?): re-run "
                         f"`{calibrate}`")


def _compare(args) -> int:
    from .compare import compare

    res = compare(args.config, overrides=args.overrides, only=args.methods, out=args.out,
                  argv=sys.argv[1:] if args._argv is None else args._argv, retrain=args.retrain)
    print(res.markdown())
    print(f"written: {res['dir']}/compare.md, compare.json, curves.png")
    if res["failed"]:
        print(f"eenn: error: {len(res['failed'])} method(s) failed, the tables hold the others: "
              + "; ".join(f"{k}: {v}" for k, v in res["failed"].items()), file=sys.stderr)
        return 1
    return 0
