"""``eenn export``: a checkpoint to staged ONNX graphs and their manifest (:func:`eenn.exporter.export`),
with the exit policy from a calibration record, the checkpoint or the flags. Registered on the main
parser by :func:`add_parser` (through :func:`eenn.serve.cli.add_parsers`, beside ``serve`` and ``plan``)."""
from __future__ import annotations

import argparse
import json
import math

__all__ = ["MODEL_HELP", "add_parser", "run_export"]

# --model of the commands that load a checkpoint (here and in eenn.cli)
MODEL_HELP = ("for a network made by eenn.attach_exits on a model of yours: the function or class that builds "
              "a fresh one, called without arguments (mymodels:make_net, or models/net.py:Net)")

EPILOG_EXPORT = """examples:
  eenn export runs/r20/best.safetensors --out export/ --policy max_prob --thresholds 0.9,0.85,0.8
  eenn export runs/r20/best.safetensors --out export/ --calibration calib.json
  eenn export runs/r20/best.safetensors --out export/ --dataset digits --max-drop 0.02

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
    e.add_argument("--max-drop", type=float, default=0.02, help="with --dataset and no --thresholds (default 0.02)")
    e.add_argument("--opset", type=int, default=17)
    e.set_defaults(run=run_export)


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
    if calib.get("policy") is not None:
        policy = ExitPolicy.from_dict(calib)
    elif "policy" in read_description(args.checkpoint):  # saved with the weights: eenn.save(..., policy=)
        policy = ExitPolicy.load(args.checkpoint)
    else:
        policy = ExitPolicy(args.policy or "max_prob")
    if args.policy and args.policy != policy.name:  # another rule: the calibration's thresholds do not apply
        policy = ExitPolicy(args.policy, fallback=policy.fallback)
    if args.fallback:
        policy = policy.replace(fallback=args.fallback)
    if args.thresholds is not None:
        policy = policy.replace(thresholds=args.thresholds)
    if net.input_spec is None and calib.get("mean") is not None and calib.get("std") is not None:
        # a checkpoint without an input description, and a calibration record that carries it (older ones did)
        net.input_spec = InputSpec(tuple(net.input_shape), tuple(calib["mean"]), tuple(calib["std"]))
    validation = calib.get("validation")
    if args.dataset:
        from .data import load_dataset

        data = load_dataset(args.dataset, data_dir=args.data_dir)
        if net.input_spec is None:  # a checkpoint without an input description: the named data set's
            net.input_spec = InputSpec.from_info(data.info)
        if policy.thresholds is None:
            rec = calibration_record(net, data.val, policy, {"max_drop": args.max_drop})
            policy, validation = ExitPolicy.from_dict(rec), rec["validation"]
            print(f"calibrated {policy.name} on {args.dataset} validation (max_drop={args.max_drop}): thresholds "
                  f"{[round(t, 4) for t in policy.thresholds.tolist()]}, accuracy {100 * validation['accuracy']:.2f}%")
    if policy.thresholds is None:
        raise ValueError("no thresholds: give --thresholds, --calibration FILE or --dataset NAME")
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
