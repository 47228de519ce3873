"""The evaluation report of a trained multi-exit network on a split.

:func:`evaluate` fits the policy's per-exit thresholds on the validation split to a goal, then
reports on the chosen split (the test split by default):

- every exit's own accuracy and cost (MACs per sample, heads included);
- the policy's accuracy, exit distribution, expected dynamic MACs and MAC speed-up, whether the
  goal held, the oracle's point and the share of its saving the policy captures;
- the *measured* wall-clock speed-up of the :class:`~eenn.engine.DynamicEngine` over the static
  backbone at batch 1 and at a large batch (warm-up, interleaved repeats, median, CUDA
  synchronised), beside the speed-up the MACs predict for the very samples timed;
- the accuracy-MACs curve: thresholds fitted on validation for a range of MAC budgets, each
  evaluated on the split, with the oracle and every single exit as reference points.

:class:`Report` holds it as plain data and writes ``report.json``, ``report.md`` (a table laid
out like Table 2 of Scardapane et al.: test accuracy, inference time, speed-up, exits) and the
plots ``curve.png`` and ``exits.png``.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from .data import TensorLoader
from .deployments import _sync, deployments as make_deployments, format_deployments, time_deployments
from .engine import DynamicEngine
from .outputs import CachedOutputs, collect_outputs
from .io import encode_inf, read_json
from .network import MultiExitNetwork
from .functional import soft_conditional
from .policies import ExitPolicy, as_policy, calibrate, evaluate_policy, oracle, report_goal

__all__ = ["Report", "evaluate", "time_engine", "accuracy_macs_curve"]


# --- measuring ------------------------------------------------------------------------------

@torch.no_grad()
def time_engine(net: MultiExitNetwork, engine: DynamicEngine, x: Tensor, batch_size: int, *,
                repeats: int = 5, warmup: int = 1) -> dict:
    """Wall-clock of the static backbone and of ``engine`` over the samples ``x`` cut into
    batches of ``batch_size``: ``warmup`` untimed passes each, then ``repeats`` timed passes,
    static and engine interleaved (so a change in machine load hits both alike); medians.

    Also returns the speed-up the MACs predict for these very samples (from the MACs the
    engine spent on each) and the ratio measured / predicted."""
    if repeats < 1 or batch_size < 1:
        raise ValueError(f"need repeats >= 1 and batch_size >= 1, got {repeats} and {batch_size}")
    net.eval()
    batches = list(x.split(batch_size))
    dev = x.device
    static = engine.static  # the backbone in the engine's micro-batches, if any

    def run(fn: Callable[[Tensor], Any]) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        _sync(dev)
        return time.perf_counter() - t0

    for _ in range(warmup):
        run(static)
        run(engine)
    t_static, t_engine = [], []
    for _ in range(repeats):
        t_static.append(run(static))
        t_engine.append(run(engine))
    spent = torch.cat([engine(b).macs for b in batches]).double().mean().item()
    full = float(net.cost().macs[-1])
    s, e = statistics.median(t_static), statistics.median(t_engine)
    measured, predicted = s / e, full / spent
    return {"batch_size": batch_size, "samples": len(x), "repeats": repeats,
            "static_ms_per_sample": 1e3 * s / len(x), "engine_ms_per_sample": 1e3 * e / len(x),
            "measured_speedup": measured, "mac_speedup": predicted, "ratio": measured / predicted}


def accuracy_macs_curve(policy: ExitPolicy | str, val: CachedOutputs, split: CachedOutputs, cost, *,
                        points: int = 12) -> list[dict]:
    """Thresholds fitted on ``val`` for ``points`` MAC budgets spread from the first exit's cost
    to the full network's, each evaluated on ``split``: ``[{budget, val_accuracy, accuracy,
    expected_macs, speedup, thresholds}]``, sorted by cost."""
    lo, hi = float(cost.dynamic_macs[0]), float(cost.macs[-1])
    out, seen = [], set()
    for b in torch.linspace(lo, hi, max(points, 2)).tolist():
        fitted = calibrate(policy, val, cost, {"budget": b})
        key = tuple(fitted.thresholds.tolist())
        if key in seen:  # a larger budget that buys nothing more on validation: same point
            continue
        seen.add(key)
        v = evaluate_policy(fitted, val, cost)
        r = evaluate_policy(fitted, split, cost)
        out.append({"budget": b, "val_accuracy": v["accuracy"], "val_macs": v["expected_macs"],
                    "accuracy": r["accuracy"], "expected_macs": r["expected_macs"], "speedup": r["speedup"],
                    "thresholds": r["thresholds"]})
    return sorted(out, key=lambda p: p["expected_macs"])


# --- the report -----------------------------------------------------------------------------

@dataclass
class Report:
    """Plain data (JSON-able) with writers. ``data`` keys: ``model``, ``dataset``, ``policy``,
    ``exits``, ``result``, ``validation``, ``timing``, ``curve``, ``oracle``, ``machine``, and
    ``weights_sha256``, the weights the thresholds were fitted on (as in a calibration record:
    ``eenn predict`` refuses the thresholds of a run trained again since)."""

    data: dict = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def to_json(self) -> str:
        return json.dumps(encode_inf(self.data), indent=2)

    # ..................................................................... Markdown
    def exits_text(self, distribution: Sequence[float] | None = None) -> str:
        dist = self.data["result"]["exit_distribution"] if distribution is None else distribution
        return ", ".join(f"#{i + 1}: {100 * p:.1f}%" for i, p in enumerate(dist) if p > 0)

    def table2_header(self) -> list[str]:
        """The Table-2 header lines, the accuracy column named after the split reported on."""
        split = {"test": "Test", "val": "Val.", "train": "Train"}.get(self.data["dataset"]["split"], "Test")
        return [f"| Architecture | {split} acc. | Inf. time (batch 1) | Speed-up | Exits |", "|---|---|---|---|---|"]

    def table2_rows(self) -> list[list[str]]:
        """Rows of the Table-2 layout: the static backbone, the policy, the oracle."""
        d, r = self.data, self.data["result"]
        t1 = next((t for t in d["timing"] if t["batch_size"] == 1), None)
        name = d["model"]["name"]
        static_ms = f"{t1['static_ms_per_sample']:.2f} ms" if t1 else "—"
        engine_ms = f"{t1['engine_ms_per_sample']:.2f} ms" if t1 else "—"
        measured = f"{t1['measured_speedup']:.2f}x measured, " if t1 else ""
        return [
            [f"{name} static", f"{100 * r['final_accuracy']:.2f}%", static_ms, "1.00x", f"#{len(r['exit_distribution'])}: 100%"],
            [f"{name} + {d['policy']['name']}", f"{100 * r['accuracy']:.2f}%", engine_ms,
             f"{measured}{r['speedup']:.2f}x MACs", self.exits_text()],
            ["oracle", f"{100 * d['oracle']['accuracy']:.2f}%", "—", f"{d['oracle']['speedup']:.2f}x MACs",
             self.exits_text(d["oracle"]["exit_distribution"])],
        ]

    def to_markdown(self) -> str:
        d, r, p = self.data, self.data["result"], self.data["policy"]
        goal = ", ".join(f"{k}={v}" for k, v in p["goal"].items())
        lines = [
            f"# {d['model']['name']} on {d['dataset']['name']} ({d['dataset']['split']} split, {d['dataset']['samples']} samples)",
            "",
            f"Policy `{p['name']}` (fallback {p['fallback']}), thresholds fitted on the validation split "
            f"({d['validation']['samples']} samples) for the goal {goal}: "
            f"{', '.join(f'{t:.4g}' for t in p['thresholds'])}. Goal held on this split: "
            f"{'yes' if r['goal_held'] else 'no'}.",
            "",
            *self.table2_header(),
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.table2_rows()]
        lines += ["", f"Oracle saving captured by the policy: {100 * r['captured_share']:.1f}%.", "",
                  "| exit | accuracy | MACs (heads on the way) | of full | answered here |", "|---|---|---|---|---|"]
        for e in d["exits"]:
            lines.append(f"| {e['name']} | {100 * e['accuracy']:.2f}% | {e['dynamic_macs']:,} | "
                         f"{100 * e['dynamic_macs'] / r['full_macs']:.1f}% | {100 * e['share']:.1f}% |")
        if d.get("gated"):
            g, f = d["gated"], d["gated"]["fixed_rule"]
            lines += ["", f"Gated network, the paper's two inference options: soft output f~_1 (every exit runs) "
                      f"{100 * g['soft_output_accuracy']:.2f}%; hard exits at the fixed gate >= {f.get('threshold', 0.5):.3g} (no fitting) "
                      f"{100 * f['accuracy']:.2f}% with a {f['speedup']:.2f}x MAC speed-up ({self.exits_text(f['exit_distribution'])})."]
        if d.get("deployments"):
            lines += ["", f"Wall-clock on {d['machine']['device']} ({d['machine']['threads']} threads), the static "
                      "and the early-exit network on every path timed side by side, interleaved, after warm-up; the "
                      "speed-up is the fastest early-exit path's over the fastest static path's:", ""]
            lines += format_deployments(d["deployments"])
        if d["curve"]:
            lines += ["", "Accuracy-MACs curve (thresholds fitted on validation per budget):", "",
                      "| MAC budget | expected MACs | speed-up | val acc. | acc. |", "|---|---|---|---|---|"]
            for c in d["curve"]:
                lines.append(f"| {c['budget']:,.0f} | {c['expected_macs']:,.0f} | {c['speedup']:.2f}x | "
                             f"{100 * c['val_accuracy']:.2f}% | {100 * c['accuracy']:.2f}% |")
        return "\n".join(lines) + "\n"

    # ..................................................................... plots
    def plot(self, directory: str | Path) -> list[Path]:
        """``curve.png`` (accuracy vs MACs: curve, calibrated point, oracle, single exits) and
        ``exits.png`` (exit distribution of the policy and of the oracle)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        d, r = self.data, self.data["result"]
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        mm = 1e6
        fig, ax = plt.subplots(figsize=(6, 4.2))
        if d["curve"]:
            ax.plot([c["expected_macs"] / mm for c in d["curve"]], [100 * c["accuracy"] for c in d["curve"]],
                    "o-", ms=3, label=f"{d['policy']['name']}, thresholds per budget")
        ax.plot([e["dynamic_macs"] / mm for e in d["exits"]], [100 * e["accuracy"] for e in d["exits"]],
                "s", color="grey", label="single exits")
        ax.plot([r["expected_macs"] / mm], [100 * r["accuracy"]], "*", ms=14, color="C3",
                label=f"calibrated ({', '.join(f'{k}={v}' for k, v in d['policy']['goal'].items())})")
        ax.plot([d["oracle"]["expected_macs"] / mm], [100 * d["oracle"]["accuracy"]], "D", color="C2", label="oracle")
        ax.set_xlabel("expected MACs per sample (millions)")
        ax.set_ylabel(f"{d['dataset']['split']} accuracy (%)")
        ax.set_title(f"{d['model']['name']} on {d['dataset']['name']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        curve = directory / "curve.png"
        fig.savefig(curve, dpi=120)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 3.2))
        e = len(r["exit_distribution"])
        xs = torch.arange(e).float()
        ax.bar((xs - 0.2).tolist(), [100 * v for v in r["exit_distribution"]], 0.4, label=d["policy"]["name"])
        ax.bar((xs + 0.2).tolist(), [100 * v for v in d["oracle"]["exit_distribution"]], 0.4, label="oracle")
        ax.set_xticks(xs.tolist(), [x["name"] for x in d["exits"]], rotation=30, fontsize=8)
        ax.set_ylabel("samples answered (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        exits = directory / "exits.png"
        fig.savefig(exits, dpi=120)
        plt.close(fig)
        return [curve, exits]

    def save(self, directory: str | Path, *, plots: bool = True) -> list[Path]:
        """Write ``report.json``, ``report.md`` and (with ``plots``) the two PNGs."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = [directory / "report.json", directory / "report.md"]
        paths[0].write_text(self.to_json())
        paths[1].write_text(self.to_markdown())
        return paths + (self.plot(directory) if plots else [])

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        return cls(read_json(path))


def _record(policy: ExitPolicy) -> dict:
    """The policy as stored in a report (a custom rule function is named, not stored)."""
    try:
        return policy.to_dict()
    except ValueError:
        return {"rule": policy.name, "thresholds": policy.thresholds.tolist(), "fallback": policy.fallback,
                "options": {}}


def _model_name(net: MultiExitNetwork) -> str:
    src = net.config.get("source") or {}
    return src.get("name") or src.get("kind") or type(net).__name__


def evaluate(net: MultiExitNetwork, data, *, policy: ExitPolicy | str = "max_prob", goal: Mapping | None = None,
             split: str = "test", fallback: str | None = None, batch_sizes: Sequence[int] = (1, 256),
             timing_samples: Sequence[int] | int | None = None, repeats: int = 5, curve_points: int = 12,
             device: str | torch.device | None = None, val: CachedOutputs | None = None,
             policy_options: Mapping | None = None, deployments: str = "all", fixed_gate: float = 0.5) -> Report:
    """The full report for ``net`` on ``data`` (a split bundle from :func:`eenn.load_dataset`).

    ``goal`` is a calibration goal (default ``{"max_drop": 0.01}``); ``batch_sizes`` the batch
    sizes timed, with ``timing_samples`` samples each (one number for all, or one per batch
    size; None: at least 256 samples and 8 batches of each size; ``batch_sizes=()`` skips timing); ``curve_points`` budgets for the accuracy-MACs curve
    (0 skips it). ``policy``: a rule name (with ``fallback``, default ``"final"``, and
    ``policy_options``, e.g. ``weights=`` for ``ensemble``) or an :class:`~eenn.policies.ExitPolicy`
    (which keeps its own fallback unless ``fallback`` is given); its thresholds are fitted to
    ``goal`` on the validation split. The network runs in eval mode and is left in the mode it
    was in.
    ``fixed_gate``: a gated network's fixed rule, reported beside the fitted thresholds (0.5, the
    branching paper's and EENets'; 1/N after EENets' v3 loss).
    ``deployments``: the paths timed (:mod:`eenn.deployments`): ``"all"`` that this machine
    offers (PyTorch eager and optimised, onnxruntime), the speed-up being the fastest early-exit
    path's over the fastest static path's; ``"eager"``: PyTorch eager only. Accuracy figures
    always come from the network as it is."""
    from .checkpoint import weights_digest

    goal = dict(goal or {"max_drop": 0.01})
    pol = as_policy(policy, fallback=fallback, **dict(policy_options or {}))
    if split not in ("val", "test", "train"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    was = net.training
    net = net.to(dev).eval()
    try:
        info = data.info
        cost = net.cost()
        split_set = getattr(data, split)
        if not len(split_set):
            raise ValueError(f"the {split} split of {info.name!r} holds no samples to report on" + (
                " (eenn.data.from_tensors was given test=None: give it test=(x, y))" if split == "test" else ""))
        val = val if val is not None else collect_outputs(net, data.val, device=dev)
        cache = collect_outputs(net, split_set, device=dev)
        fitted = calibrate(pol, val, cost, goal)
        result = report_goal(fitted, cache, cost, goal)
        on_val = evaluate_policy(fitted, val, cost)
        exit_acc = (cache.logits.argmax(-1) == cache.targets[None]).double().mean(1).tolist()
        exits = [{"name": n, "accuracy": a, "macs": int(m), "dynamic_macs": int(dm), "params": int(p), "share": s}
                 for n, a, m, dm, p, s in zip(cost.exit_names, exit_acc, cost.macs, cost.dynamic_macs, cost.params,
                                              result["exit_distribution"])]
        o = oracle(cache, cost)
        gated = None
        if cache.gates is not None:
            # The differentiable-branching paper's two inference options: (1) the soft output f~_1
            # (every exit runs; an ensemble, nothing saved) and (2) hard exits by the gates at the
            # fixed threshold, 0.5 unless the method says otherwise (beside the thresholds fitted above).
            fixed = evaluate_policy(ExitPolicy("gate", fixed_gate, fallback=pol.fallback), cache, cost)
            soft = soft_conditional(cache.logits.softmax(-1), cache.gates)
            gated = {"soft_output_accuracy": (soft.argmax(-1) == cache.targets).double().mean().item(),
                     "fixed_rule": {"threshold": float(fixed_gate),
                                    **{k: fixed[k] for k in ("accuracy", "speedup", "expected_macs", "exit_distribution")}}}

        timing, deploy = [], None
        if batch_sizes:
            if timing_samples is None:
                counts = [max(256, 8 * b) for b in batch_sizes]
            elif isinstance(timing_samples, int):
                counts = [timing_samples] * len(batch_sizes)
            else:
                counts = list(timing_samples)
                counts = counts * len(batch_sizes) if len(counts) == 1 else counts
            if len(counts) != len(batch_sizes):
                raise ValueError(f"timing_samples {list(counts)}: give one count, or one per batch size "
                                 f"({len(batch_sizes)} for {list(batch_sizes)})")
            x_all = next(iter(TensorLoader(split_set, max(counts), input_spec=net.input_spec, device=dev)))[0]
            paths = make_deployments(net, fitted, device=dev, paths=deployments, val=data.val)
            deploy = time_deployments(net, fitted, x_all, batch_sizes, samples=counts, repeats=repeats, paths=paths)
            timing = [{"batch_size": r["batch_size"], "samples": r["samples"], "repeats": repeats,
                       "static_ms_per_sample": r["paths"][r["best_static"]]["static_ms"],
                       "engine_ms_per_sample": r["paths"][r["best_early"]]["early_ms"], "measured_speedup": r["speedup"],
                       "mac_speedup": r["mac_speedup"], "ratio": r["ratio"], "best_static": r["best_static"],
                       "best_early": r["best_early"]} for r in deploy["rows"]]
        curve = accuracy_macs_curve(pol, val, cache, cost, points=curve_points) if curve_points else []
        data_out = {
            "model": {"name": _model_name(net), "exits": list(cost.exit_names), "params": cost.total_params,
                      "full_macs": int(cost.macs[-1])},
            "dataset": {"name": info.name, "split": split, "samples": len(split_set)},
            "validation": {"samples": len(val.targets), "accuracy": on_val["accuracy"],
                           "final_accuracy": on_val["final_accuracy"], "expected_macs": on_val["expected_macs"],
                           "speedup": on_val["speedup"]},
            "policy": {"name": pol.name, "goal": goal, **_record(fitted)},
            "exits": exits,
            "result": result,
            "oracle": o,
            **({"gated": gated} if gated else {}),
            "timing": timing,
            "deployments": deploy,
            "curve": curve,
            "machine": {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
                        "threads": torch.get_num_threads(), "torch": torch.__version__},
            "weights_sha256": weights_digest(net),  # read as a calibration record's: stale thresholds are refused
        }
        return Report(data_out)
    finally:
        net.train(was)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"
