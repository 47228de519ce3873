"""``eenn export``: a checkpoint to staged ONNX graphs and their manifest (:func:`eenn.exporter.export`),
with the exit policy from a calibration record, the checkpoint or the flags. Registered on the main
parser by :func:`add_parser` (through :func:`eenn.serve.cli.add_parsers`, beside ``serve`` and ``plan``)."""
from __future__ import annotations

import argparse
import json
import math
import sys

__all__ = ["MODEL_HELP", "add_parser", "run_export"]

# --model of the commands that load a checkpoint (here and in eenn.cli)
MODEL_HELP = ("for a network made by eenn.attach_exits on a model of yours: the function or class that builds "
              "a fresh one, called without arguments (mymodels:make_net, or models/net.py:Net)")

EPILOG_EXPORT = """examples:
  eenn export runs/r20/best.safetensors --out export/ --policy max_prob --thresholds 0.9,0.85,0.8
  eenn export runs/r20/best.safetensors --out export/ --calibration calib.json
  eenn export runs/r20/best.safetensors --out export/ --dataset digits --max-drop 0.02   # default 0.01

--calibration reads a calibration record {"policy": {"rule", "thresholds", "fallback", "options"},
"validation": ...} (`eenn calibrate` and eenn.exporter.calibration_record write it; older flat
records {"policy": name, "thresholds", ...} are read too); without it, a policy saved in the
checkpoint (eenn.save(..., policy=)) is used. The normalisation and class names are the network's own
(net.input_spec, set by training); --dataset supplies them only for a checkpoint without one and,
without --thresholds, calibrates on its validation split for --max-drop and records the validation
exit distribution (which `eenn plan` needs).
"""


def _floats(text: str) -> list[float] | float:
    """``--thresholds``: one number (``.9``, ``inf``) or several (``0.9,0.8`` or ``[0.9, 0.8]``); not NaN."""
    try:
        v = json.loads(text)
    except json.JSONDecodeError:
        parts = text.split(",")
        try:
            v = [float(t) for t in parts] if len(parts) > 1 else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    values = v if isinstance(v, list) else [v]
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in values):
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}")
    if any(math.isnan(t) for t in values):
        raise argparse.ArgumentTypeError(f"{text!r}: a NaN threshold never lets an exit fire; use inf for that")
    return [float(t) for t in values] if isinstance(v, list) else float(v)


def add_parser(subparsers) -> None:
    """Register ``export`` on the main parser's subparsers."""
    e = subparsers.add_parser("export", help="write each segment as an ONNX graph plus a manifest",
                              description="Export a checkpoint as staged ONNX graphs (one per segment: "
                              "stages plus exit head) and manifest.json (policy, thresholds, MACs, shapes).",
                              epilog=EPILOG_EXPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("checkpoint", help="a .safetensors checkpoint written by eenn")
    e.add_argument("--model", default=None, metavar="MODULE:FUNCTION", help=MODEL_HELP)
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--policy", default=None, help="exit policy (default: the calibration's, else max_prob)")
    e.add_argument("--thresholds", type=_floats, default=None, help="one value or one per non-final exit: 0.9,0.8")
    e.add_argument("--fallback", default=None, choices=["final", "most_confident"])
    e.add_argument("--calibration", default=None, metavar="FILE", help="JSON with thresholds etc. (see below)")
    e.add_argument("--dataset", default=None, help="registered data set for normalisation / calibration")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--max-drop", type=float, default=0.01,
                   help="with --dataset and no --thresholds (default 0.01, as eenn train and eenn calibrate)")
    e.add_argument("--opset", type=int, default=17)
    e.set_defaults(run=run_export)


def _training_split(checkpoint: str, dataset: str) -> dict | None:
    """How the network in ``checkpoint`` was split for training on ``dataset``, as
    :func:`eenn.load_dataset` options (``seed``, ``val_fraction``, ``limit``, ``data_dir``):
    from its run's ``config.yaml`` beside it (written whole by ``eenn train``), else from what
    the checkpoint records; None where neither says, or for another data set. The YAML is read
    here rather than through ``eenn.run.read_run_config``, which would bring the training modules
    into the serving side (``eenn serve`` registers this command)."""
    from pathlib import Path

    from .checkpoint import read_description
    from .data.datasets import dataset_key
    from .io import yaml_load

    def same(a) -> bool:
        return a is not None and dataset_key(a) == dataset_key(dataset)

    run = Path(checkpoint).parent / "config.yaml"
    if run.is_file():
        try:
            cfg = yaml_load(run.read_text()) or {}
            d, t = cfg.get("data") or {}, cfg.get("train") or {}
            if same(d.get("name")):
                return {"seed": int(t.get("seed", 0)), "val_fraction": float(d.get("val_fraction", 0.1)),
                        "limit": d.get("limit"), "data_dir": d.get("data_dir")}
        except (OSError, ValueError, TypeError, AttributeError, __import__("yaml").YAMLError):
            pass  # not a run's config: what the checkpoint says
    data = (read_description(checkpoint).get("extra") or {}).get("data") or {}
    split = data.get("split")
    return dict(split) if isinstance(split, dict) and same(data.get("name")) else None


def run_export(args) -> int:
    from .checkpoint import load, read_description
    from .data import InputSpec
    from .exporter import calibration_record, export
    from .io import read_json
    from .policies import ExitPolicy

    calib = {}
    if args.calibration:
        try:
            calib = read_json(args.calibration)  # `eenn calibrate` writes infinite thresholds as "inf"
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.calibration}: not a JSON calibration record ({e})") from None
    net = load(args.checkpoint, model=args.model).eval()
    fitted_on = calib.get("weights_sha256")
    if fitted_on is not None:
        from .checkpoint import weights_digest

        if fitted_on != weights_digest(net):
            raise ValueError(f"--calibration {args.calibration} was fitted on other weights than {args.checkpoint}'s "
                             "(the run was trained again, or it is another checkpoint's); its thresholds do not hold "
                             "for these: run `eenn calibrate` on this checkpoint again")
    if calib.get("policy") is not None:
        policy = ExitPolicy.from_dict(calib)
    elif "policy" in read_description(args.checkpoint):  # saved with the weights: eenn.save(..., policy=)
        policy = ExitPolicy.load(args.checkpoint)
    else:
        policy = ExitPolicy(args.policy or "max_prob")
    fitted = policy if calib.get("policy") is not None else None
    dropped = None
    if args.policy and args.policy != policy.name:  # another rule: the calibration's thresholds do not apply
        dropped = f"--policy {args.policy} is not the rule {policy.name!r} that {args.calibration or args.checkpoint} fixes"
        policy = ExitPolicy(args.policy, fallback=policy.fallback)
    if args.fallback:
        policy = policy.replace(fallback=args.fallback)
    if args.thresholds is not None:
        policy = policy.replace(thresholds=args.thresholds)
    if net.input_spec is None and calib.get("mean") is not None and calib.get("std") is not None:
        # a checkpoint without an input description, and a calibration record that carries it (older ones did)
        net.input_spec = InputSpec(tuple(net.input_shape), tuple(calib["mean"]), tuple(calib["std"]))
    validation = calib.get("validation")
    # the record's exit distribution is its own policy's, which eenn plan would weigh latencies with
    stale = validation is not None and fitted is not None and policy.to_dict() != fitted.to_dict()
    if stale:
        validation = None
    if args.dataset:
        from .data import load_dataset

        split = _training_split(args.checkpoint, args.dataset)
        if split is None:
            print(f"note: {args.checkpoint} does not say how {args.dataset} was split for its training: calibrating "
                  "on the default validation split (seed 0, val_fraction 0.1), which holds samples it was trained on "
                  "if it was split otherwise; `eenn calibrate RUN` calibrates on the run's own split (then give "
                  "--calibration)", file=sys.stderr)
            split = {}
        data_dir = args.data_dir or split.pop("data_dir", None)
        split.pop("data_dir", None)
        data = load_dataset(args.dataset, data_dir=data_dir, **split)
        if net.input_spec is None:  # a checkpoint without an input description: the named data set's
            net.input_spec = InputSpec.from_info(data.info)
        if policy.thresholds is None:
            rec = calibration_record(net, data.val, policy, {"max_drop": args.max_drop})
            policy, validation = ExitPolicy.from_dict(rec), rec["validation"]
            print(f"calibrated {policy.name} on {args.dataset} validation ({len(data.val)} samples, seed "
                  f"{data.info.split['seed']}, val_fraction {data.info.split['val_fraction']}; max_drop={args.max_drop}): thresholds "
                  f"{[round(t, 4) for t in policy.thresholds.tolist()]}, accuracy {100 * validation['accuracy']:.2f}%")
    if policy.thresholds is None:
        if dropped:
            raise ValueError(f"no thresholds: {dropped}, so its thresholds do not apply; calibrate for {args.policy} "
                             f"(`eenn calibrate RUN --policy {args.policy}`, then --calibration), or give --thresholds "
                             "or --dataset NAME")
        raise ValueError("no thresholds: give --thresholds, --calibration FILE or --dataset NAME")
    if stale and validation is None:
        print(f"note: --policy/--fallback/--thresholds change the policy {args.calibration} was fitted to, so its "
              "validation exit distribution does not describe this export and is left out (`eenn plan` then asks for "
              "one: calibrate the policy you export, e.g. `eenn calibrate RUN --policy NAME`)", file=sys.stderr)
    m = export(net, args.out, policy=policy, validation=validation, opset=args.opset)
    print(f"exported {m['num_exits']} segments to {args.out} (max |ONNX - PyTorch| logit "
          f"{m['check']['max_abs_logit_diff']:.2g})")
    for seg in m["segments"]:
        print(f"  {seg['file']:<16} {seg['exit_name']:<22} {seg['macs']:>12,} MACs  hand-off "
              f"{seg['handoff_bytes_per_sample']:>8,} B/sample")
    print(f"  {m['static']['file']:<16} the static network as one graph (the baseline; serving it whole)")
    fused = m["fused"]
    print(f"  {fused['file']:<16} one call per sample, the {fused['rule']} rule inside (batch 1)" if fused["file"]
          else f"  no fused batch-1 graph: {fused['reason']}")
    return 0
