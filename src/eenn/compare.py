"""Several methods on one backbone and data set, side by side (``eenn compare``).

A compare file is a run config (``data``, ``model``, ``objective``, ``train``, ``eval``) plus
``methods: {label: {section: {...}, prune: bool}}``; each method's sections are merged over the
base and validated. Every method becomes a run directory ``<out>/<label>`` (trained or resumed,
then reported); the comparison goes to ``<out>/compare.md``, ``compare.json`` and
``curves.png``:

- Table 1: test accuracy of each method at its final exit (no early exit);
- Table 2: each method with early exit enabled (thresholds fitted on validation): test accuracy,
  inference time at batch 1, measured and MAC speed-up, exit distribution, and the oracle;
- ``prune: true`` (AEP): the validation-chosen truncation of the ensemble, its accuracy and costs;
- one accuracy-MACs figure with every method's curve and oracle point.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from .config import (ConfigError, RunConfig, apply_overrides, check_config, config_from_dict, config_to_dict, merge, read_yaml,
                     save_config)
from .io import read_json, write_json
from .policies import ExitPolicy
from .report import Report
from .run import build_data, evaluate_run, open_run, run_info, train_run

__all__ = ["compare", "load_compare", "CompareResult"]


def _slug(label: str) -> str:
    """The run directory's name for a method's label (never ``.`` or ``..``: inside ``--out``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.") or "method"


def load_compare(path: str | Path, overrides: list[str] | None = None,
                 only: list[str] | None = None) -> tuple[RunConfig, dict[str, tuple[RunConfig, dict]]]:
    """The base config and ``{label: (config, extras)}`` of a compare file; ``overrides``
    (``train.epochs=1``) apply to the base and so to every method."""
    values = read_yaml(path)
    methods = values.pop("methods", None)
    if not isinstance(methods, Mapping) or not methods:
        raise ConfigError(f"{path}: a compare file needs 'methods: {{label: {{objective: ...}}, ...}}' with at least one method")
    base_values = apply_overrides(values, overrides)
    try:
        base = config_from_dict(base_values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if only:
        missing = [m for m in only if m not in methods]
        if missing:
            raise ConfigError(f"{path}: no method {missing[0]!r}; the file has {', '.join(methods)}")
        methods = {k: v for k, v in methods.items() if k in only}
    out = {}
    for label, spec in methods.items():
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{path}: methods.{label}: expected a mapping of sections, got {spec!r}")
        spec = dict(spec)
        extras = {"prune": spec.pop("prune", False)}
        if not isinstance(extras["prune"], bool):
            raise ConfigError(f"{path}: methods.{label}.prune: expected true or false, got {extras['prune']!r}")
        try:
            cfg = check_config(config_from_dict(merge(base_values, spec)))
        except ConfigError as e:
            raise ConfigError(f"{path}: methods.{label}: {e}") from None
        if extras["prune"] and "weights" not in cfg.eval.policy_options:
            raise ConfigError(f"{path}: methods.{label}.prune: pruning keeps the best truncation of the AEP ensemble, "
                              "which needs eval.policy_options.weights (e.g. {weights: linear})")
        taken = next((other for other in out if _slug(other) == _slug(str(label))), None)
        if taken is not None:
            raise ConfigError(f"{path}: methods {taken!r} and {label!r} would share the run directory "
                              f"{_slug(str(label))!r}: rename one")
        out[str(label)] = (cfg, extras)
    return base, out


class CompareResult(dict):
    """``{"methods": {label: {...}}, "dir": ...}`` with the Markdown the command writes."""

    def markdown(self) -> str:
        return self["markdown"]


def compare(path: str | Path, *, overrides: list[str] | None = None, only: list[str] | None = None,
            out: str | Path | None = None, argv: list[str] | None = None, retrain: bool = False) -> CompareResult:
    """Train (or resume) and report every method of the compare file at ``path``; write the
    side-by-side tables and figure to ``out`` (default: the base ``train.out_dir``)."""
    base, methods = load_compare(path, overrides, only)
    root = Path(out or base.train.out_dir or f"runs/{base.data.name}-{base.model.backbone}-compare")
    root.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for label, (cfg, extras) in methods.items():
        run_dir = root / _slug(label)
        cfg.train.out_dir = str(run_dir)
        print(f"== {label}: {cfg.objective.name} {cfg.objective.options or ''} -> {run_dir}", flush=True)
        try:  # one method failing (diverged, say) does not cost the others their turn
            rows[label] = _method(label, cfg, extras, run_dir, argv, retrain)
        except (ValueError, RuntimeError, FloatingPointError, OSError) as e:
            failed[label] = f"{type(e).__name__}: {e}"
            print(f"== {label}: failed ({failed[label]})", file=sys.stderr, flush=True)
    left_out: dict[str, str] = {}
    if only:  # the tables keep the file's other methods whose runs are trained with its settings
        _, every = load_compare(path, overrides)
        for label, (cfg, extras) in every.items():
            run_dir = root / _slug(label)
            cfg.train.out_dir = str(run_dir)
            if label in rows or label in failed:
                continue
            state = _finished(run_dir, cfg)
            if state == "done":
                rows[label] = {"dir": str(run_dir), "objective": cfg.objective.name,
                               "report": Report.load(run_dir / "report.json").data}
                if extras["prune"] and (run_dir / "prune.json").exists():
                    rows[label]["prune"] = read_json(run_dir / "prune.json")
            elif state == "trained":  # other evaluation settings: evaluated again under them, nothing trained
                print(f"== {label}: not in --methods; evaluated again under the new eval settings (no training)",
                      flush=True)
                try:
                    rows[label] = _method(label, cfg, extras, run_dir, argv, False)
                except (ValueError, RuntimeError, FloatingPointError, OSError) as e:
                    failed[label] = f"{type(e).__name__}: {e}"
                    print(f"== {label}: failed ({failed[label]})", file=sys.stderr, flush=True)
            else:
                left_out[label] = _why_left_out(run_dir, cfg)
                print(f"== {label}: left out of the tables ({left_out[label]})", flush=True)
        rows = {label: rows[label] for label in every if label in rows}
    if not rows:
        raise RuntimeError("every method failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    md = _markdown(base, rows)
    if failed:
        md += "\nFailed, not in the tables (fix the method and run the command again):\n\n" + "".join(
            f"- {label}: {why}\n" for label, why in failed.items())
    if left_out:
        md += ("\nLeft out of the tables: not run with these settings (run them with `--methods "
               f"{','.join(left_out)}`):\n\n" + "".join(f"- {label}: {why}\n" for label, why in left_out.items()))
    (root / "compare.md").write_text(md)
    write_json({"run": run_info(argv), "methods": rows, "failed": failed, "left_out": left_out},
               root / "compare.json")
    _plot(rows, root / "curves.png", base)
    return CompareResult(methods=rows, dir=str(root), markdown=md, failed=failed)


def _method(label: str, cfg: RunConfig, extras: dict, run_dir: Path, argv, retrain: bool) -> dict[str, Any]:
    """One method's row: its run trained (or resumed, or only reported again) and reported."""
    state = "untrained" if retrain else _finished(run_dir, cfg)
    if state == "done":
        report = Report.load(run_dir / "report.json")
    elif state == "trained":  # only the evaluation settings changed: report again, no training
        net, _, _ = open_run(run_dir)
        report = evaluate_run(net, build_data(cfg), cfg, run_dir)
        save_config(cfg, run_dir / "config.yaml")
    else:
        if retrain:  # from the start, not resumed from the finished run's last epoch
            cfg = replace(cfg, train=replace(cfg.train, resume=False))
        try:
            report = train_run(cfg, argv=argv)["report"]
        except ConfigError as e:
            if "trained with other settings" not in str(e):
                raise
            raise ConfigError(f"method {label!r}: {run_dir} holds a run trained with other settings; train it "
                              f"again with `eenn compare ... --retrain --methods '{label}'` ({e})") from None
    row: dict[str, Any] = {"dir": str(run_dir), "objective": cfg.objective.name, "report": report.data}
    if extras["prune"]:
        row["prune"] = _prune(run_dir, cfg)
    return row


def _finished(run_dir: Path, cfg: RunConfig) -> str:
    """``"done"`` (trained and reported with this very config), ``"trained"`` (trained with it,
    reported with other evaluation settings) or ``"untrained"``."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists() or not (run_dir / "config.yaml").exists():
        return "untrained"
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    saved, want = read_yaml(run_dir / "config.yaml"), config_to_dict(cfg)
    trained = all(saved.get(k) == v for k, v in want.items() if k != "eval")
    if not (trained and lines and (lines[-1].get("epoch") == cfg.train.epochs or _stopped_early(run_dir, cfg))):
        return "untrained"
    done = saved.get("eval") == want.get("eval") and (run_dir / "report.json").exists()
    return "done" if done and _report_fits_weights(run_dir) else "trained"


def _report_fits_weights(run_dir: Path) -> bool:
    """Whether ``report.json`` was made on the weights the run holds now (its ``weights_sha256``
    against the stored checkpoint's); a report that does not name its weights (older ones) fits."""
    from .checkpoint import read_description, weights_digest

    fitted_on = Report.load(run_dir / "report.json").data.get("weights_sha256")
    if fitted_on is None:
        return True
    best = run_dir / "best.safetensors"
    if best.exists():  # saved without a training state: its stored digest is the weights'
        return read_description(best).get("sha256") == fitted_on
    net, _, _ = open_run(run_dir)
    return weights_digest(net) == fitted_on


def _why_left_out(run_dir: Path, cfg: RunConfig) -> str:
    """Why a method that :func:`_finished` calls untrained cannot be in the tables, in words."""
    from .run import _differences

    if not (run_dir / "config.yaml").exists() or not (run_dir / "metrics.jsonl").exists():
        return f"not trained yet ({run_dir} holds no finished run)"
    saved, want = read_yaml(run_dir / "config.yaml"), config_to_dict(cfg)
    diff = [d for k, v in want.items() if k != "eval" for d in _differences(saved.get(k), v, f"{k}.")]
    if diff:
        return f"its run was trained with other settings ({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''})"
    lines = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return f"its run is unfinished ({len(lines)} of {cfg.train.epochs} epochs)"


def _stopped_early(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether the run's last checkpoint records that early stopping ended it (its training is then
    finished, short of ``train.epochs``). A checkpoint that cannot tell is not."""
    from .callbacks import EarlyStopping
    from .checkpoint import read_description

    last = run_dir / "last.safetensors"
    if not cfg.train.early_stopping or not last.is_file():
        return False
    stopping = EarlyStopping(cfg.train.early_stopping, cfg.train.monitor)
    try:
        state = read_description(last).get("state") or {}
        stopping.load_state_dict(state.get("callbacks", {}).get("EarlyStopping"))
    except (ValueError, TypeError, AttributeError):  # damaged: training it again says what is wrong
        return False
    return stopping.stopped


def _prune(run_dir: Path, cfg: RunConfig) -> dict:
    from .prune import aep_prune, evaluate_ensemble, measure_latency
    net, _, _ = open_run(run_dir)
    data = build_data(cfg)
    if cfg.eval.policy_options.get("weights") is None:
        raise ConfigError(f"prune: needs eval.policy_options.weights (a scheme name or a list) for {run_dir}")
    w = ExitPolicy("ensemble", **cfg.eval.policy_options).bind(net.num_exits, need_thresholds=False).options["weights"]
    res = aep_prune(net.eval(), w, data.val, latency_batch_size=256, latency_repeats=5)
    test_acc = evaluate_ensemble(res.module, data.test)
    full_acc = evaluate_ensemble(res.full, data.test)
    lat1 = [measure_latency(m, net.input_shape, 1, repeats=20) for m in (res.full, res.module)]
    static = measure_latency(net.backbone.eval(), net.input_shape, 1, repeats=20)
    out = {"k": res.k, "exit": res.exit_name, "promised_accuracy": res.promised_acc, "test_accuracy": test_acc,
           "full_ensemble_test_accuracy": full_acc, "params": [res.before.params, res.after.params],
           "macs": [res.before.macs, res.after.macs], "latency_ms_batch1": lat1,
           "latency_ms_batch256": [res.before.latency_ms, res.after.latency_ms], "static_backbone_ms_batch1": static}
    (run_dir / "prune.json").write_text(json.dumps(out, indent=2))
    return out


def _markdown(base: RunConfig, rows: dict[str, dict]) -> str:
    labels = list(rows)
    any_report = Report(next(iter(rows.values()))["report"])
    d = any_report.data
    split = d["dataset"].get("split", "test")  # the split the rows report on (eval.split), "test" by default
    acc = {"test": "Test", "val": "Val.", "train": "Train"}.get(split, "Test") + " acc."
    lines = [f"# {base.model.backbone} on {base.data.name}: {', '.join(labels)}", "",
             f"Table 1: {split} accuracy at the final exit (no early exit).", "",
             "| " + " | ".join(["data set", *labels]) + " |", "|---" * (len(labels) + 1) + "|",
             "| " + " | ".join([d["dataset"]["name"], *(f"{100 * r['report']['result']['final_accuracy']:.2f}%"
                                                        for r in rows.values())]) + " |",
             "| " + " | ".join(["soft output (gated: option 1)",
                                *(f"{100 * r['report']['gated']['soft_output_accuracy']:.2f}%" if "gated" in r["report"]
                                  else "—" for r in rows.values())]) + " |", "",
             f"Table 2: early exit enabled (thresholds fitted on the validation split), {split} split. Inference time is "
             "per sample at batch 1 on this machine; speed-up is over the static backbone, measured on the clock "
             "and predicted by MACs.", "",
             f"| Method | {acc} | Inf. time | Speed-up (measured) | Speed-up (MACs) | Exits | Oracle acc. | Oracle speed-up (MACs) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, row in rows.items():
        r = row["report"]
        res, o = r["result"], r["oracle"]
        t1 = next((t for t in r["timing"] if t["batch_size"] == 1), None)
        time_ = f"{t1['engine_ms_per_sample']:.2f} ms (static {t1['static_ms_per_sample']:.2f})" if t1 else "—"
        meas = f"{t1['measured_speedup']:.2f}x" if t1 else "—"
        lines.append(f"| {label} ({r['policy']['name']}) | {100 * res['accuracy']:.2f}% | {time_} | {meas} | "
                     f"{res['speedup']:.2f}x | {Report(r).exits_text()} | "
                     f"{100 * o['accuracy']:.2f}% | {o['speedup']:.2f}x |")
    fixed = [(label, row["report"]["gated"]["fixed_rule"]) for label, row in rows.items() if "gated" in row["report"]]
    if fixed:
        lines += ["", "Gated methods with the paper's fixed rule (first gate at the threshold, 0.5, or 1/N after "
                  f"EENets' v3 loss; no fitting), {split} split:", "",
                  f"| Method | Threshold | {acc} | Speed-up (MACs) | Exits |", "|---|---|---|---|---|"]
        for label, f in fixed:
            lines.append(f"| {label} | {f.get('threshold', 0.5):.3g} | {100 * f['accuracy']:.2f}% | {f['speedup']:.2f}x | "
                         f"{Report(rows[label]['report']).exits_text(f['exit_distribution'])} |")
    for label, row in rows.items():
        p = row.get("prune")
        if p:
            lines += ["", f"{label} pruned (AEP): k* = {p['k']} ({p['exit']}), test accuracy "
                      f"{100 * p['test_accuracy']:.2f}% (full ensemble {100 * p['full_ensemble_test_accuracy']:.2f}%, "
                      f"promised on val {100 * p['promised_accuracy']:.2f}%); params {p['params'][0]:,} -> {p['params'][1]:,}, "
                      f"MACs {p['macs'][0]:,} -> {p['macs'][1]:,}, latency at batch 1 {p['latency_ms_batch1'][0]:.2f} -> "
                      f"{p['latency_ms_batch1'][1]:.2f} ms (static backbone {p['static_backbone_ms_batch1']:.2f} ms)."]
    lines += ["", "Figure: curves.png (test accuracy against expected MACs per method; diamonds: oracles)."]
    return "\n".join(lines) + "\n"


def _plot(rows: dict[str, dict], path: Path, base: RunConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (label, row) in enumerate(rows.items()):
        r, c = row["report"], f"C{i % 10}"
        curve = r["curve"] or [{"expected_macs": r["result"]["expected_macs"], "accuracy": r["result"]["accuracy"]}]
        ax.plot([p["expected_macs"] / 1e6 for p in curve], [100 * p["accuracy"] for p in curve], "o-", ms=3,
                color=c, label=label)
        ax.plot([r["oracle"]["expected_macs"] / 1e6], [100 * r["oracle"]["accuracy"]], "D", color=c, ms=6)
        if row.get("prune"):
            p = row["prune"]
            ax.plot([p["macs"][1] / 1e6], [100 * p["test_accuracy"]], "P", color=c, ms=9)
    ax.set_xlabel("expected MACs per sample (millions)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{base.model.backbone} on {base.data.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
