"""The search's output: the admissible Pareto set as a Markdown table and JSON, a plot of every
trial with the front and the constraint lines, and one YAML per design that retrains it fully
(``network:`` = :class:`eenn.NetworkConfig` fields, ``train:`` = :class:`eenn.TrainConfig` fields)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from .config import SearchConfig

__all__ = ["design_config", "pareto_designs", "pareto_front", "plot_trials", "summarise", "trial_records",
           "write_report"]


def trial_records(study, accuracy_floor: float, macs_ceiling: float) -> list[dict[str, Any]]:
    """Every trial as a flat dict: number, state, params, its figures, and whether it is
    admissible under *these* constraints (so a report can be redrawn with other ones)."""
    out = []
    for t in study.get_trials(deepcopy=False):
        a = dict(t.user_attrs)
        r = {"number": t.number, "state": t.state.name, "params": dict(t.params), **a}
        complete = t.state.name == "COMPLETE" and "val_accuracy" in a
        r["admissible"] = bool(complete and a["val_accuracy"] >= accuracy_floor - 1e-12
                               and a["val_macs"] <= macs_ceiling * (1 + 1e-12))
        out.append(r)
    return out


def pareto_front(points: Sequence[dict[str, Any]], acc: str = "val_accuracy", macs: str = "val_macs") -> list[dict]:
    """The points no other point dominates (accuracy at least as high and MACs at most as high,
    one of them strictly), by increasing MACs; of equal points the first is kept."""
    front: list[dict] = []
    for p in sorted(points, key=lambda r: (r[macs], -r[acc], r.get("number", 0))):
        if front and p[acc] <= front[-1][acc]:
            continue  # as cheap or costlier, and not more accurate: dominated (or a duplicate)
        front.append(p)
    return front


def pareto_designs(study, accuracy_floor: float, macs_ceiling: float) -> list[dict[str, Any]]:
    """The admissible Pareto set of ``study``: complete trials satisfying both constraints on the
    validation split, none dominated by another; sorted by expected MACs."""
    return pareto_front([r for r in trial_records(study, accuracy_floor, macs_ceiling) if r["admissible"]])


def _why_empty(records: list[dict], floor: float, ceiling: float) -> str:
    done = [r for r in records if r["state"] == "COMPLETE" and "val_accuracy" in r]
    pruned = [r for r in records if r["state"] == "PRUNED"]
    head = (f"no admissible design: none of {len(done)} trained design(s) (and {len(pruned)} pruned) reached "
            f"val accuracy >= {floor:.4f} with expected MACs <= {ceiling:,.0f}.")
    if not done:
        return head + " Every candidate was pruned: raise macs_ceiling, or lower search.prune_below."
    best = max(done, key=lambda r: r["val_accuracy"])
    parts = [f" The most accurate reached {100 * best['val_accuracy']:.2f}% at {best['val_macs']:,.0f} MACs."]
    over_floor = [r for r in done if r["val_accuracy"] >= floor]
    if over_floor:
        c = min(over_floor, key=lambda r: r["val_macs"])
        parts.append(f" The cheapest reaching the floor needed {c['val_macs']:,.0f} MACs (> ceiling): raise "
                     f"macs_ceiling to at least that, or lower accuracy_floor.")
    else:
        under = [r for r in done if r["val_macs"] <= ceiling]
        if under:
            b = max(under, key=lambda r: r["val_accuracy"])
            parts.append(f" Under the ceiling the best was {100 * b['val_accuracy']:.2f}%: lower accuracy_floor to at "
                         f"most that, raise macs_ceiling, or train candidates longer (train.epochs).")
        else:
            parts.append(" No design reached the floor at all: lower accuracy_floor or train candidates longer.")
    return head + "".join(parts)


def summarise(study, config: SearchConfig) -> tuple[list[dict], list[dict], str]:
    """``(records, front, message)``; the message says plainly when the constraints admit nothing."""
    fl, ce = config.accuracy_floor, config.macs_ceiling
    records = trial_records(study, fl, ce)
    front = pareto_front([r for r in records if r["admissible"]])
    n_done = sum(r["state"] == "COMPLETE" and r.get("duplicate_of") is None for r in records)
    n_rep = sum(r["state"] == "COMPLETE" and r.get("duplicate_of") is not None for r in records)
    n_pruned = sum(r["state"] == "PRUNED" for r in records)
    n_adm = sum(r["admissible"] for r in records)
    if front:
        msg = (f"{len(front)} Pareto-optimal admissible design(s) out of {n_adm} admissible trial(s); {n_done} design(s) "
               f"trained, {n_rep} repeat(s) of a trained design, {n_pruned} pruned.")
    else:
        msg = _why_empty(records, fl, ce)
    return records, front, msg


def design_config(record: dict[str, Any], config: SearchConfig, *, study_name: str = "") -> dict[str, Any]:
    """One design as an :class:`eenn.config.RunConfig` file that ``eenn train --config`` retrains
    fully: ``data``, ``model``, ``objective``, ``train`` (the proxy settings with ``retrain`` on
    top), ``eval`` (the search's policy and goal; thresholds are re-fitted after training) and
    ``meta.search`` (what the search measured, and the proxy-trained thresholds)."""
    from ..trainer import TrainConfig
    import dataclasses

    train = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    train.update({**config.train, **config.retrain, "seed": config.seed})
    train.update(progress=True, out_dir=None)
    ds = {k: v for k, v in config.dataset.items() if k in ("name", "data_dir", "val_fraction")}
    net = record["network"]
    measured = {k: record.get(k) for k in ("val_accuracy", "val_macs", "test_accuracy", "test_macs",
                                           "val_final_accuracy", "test_final_accuracy", "full_macs", "params",
                                           "repaired", "val_exit_distribution")}
    return {
        "data": ds,
        "model": {k: net[k] for k in ("backbone", "backbone_options", "exits", "head", "head_options") if k in net},
        "objective": {"name": config.objective, "options": dict(config.objective_options)},
        "train": train,
        "eval": {"policy": config.policy, "fallback": config.fallback, "goal": {"max_drop": config.max_drop}},
        "meta": {"search": {"study": study_name, "trial": record["number"], "params": record["params"],
                            "constraints": {"accuracy_floor": config.accuracy_floor, "macs_ceiling": config.macs_ceiling},
                            "proxy_train": dict(config.train), "proxy_thresholds": record.get("thresholds"),
                            "network": net, "measured": measured}},
    }


def _k(x: float) -> str:
    return f"{x / 1e3:,.1f}K" if x < 1e6 else f"{x / 1e6:,.2f}M"  # MACs, short


def _describe(net: dict[str, Any]) -> str:
    o = net.get("backbone_options", {})
    if "depths" in o:
        arch = "d" + "-".join(map(str, o["depths"])) + " c" + "-".join(map(str, o["channels"]))
    else:
        arch = " ".join(f"[t{r[0]} c{r[1]} n{r[2]} s{r[3]} k{r[4]}]" for r in o.get("settings", []))
    ho = net.get("head_options", {})
    head = net.get("head", "?") + (f"/{ho['width']}" if ho.get("width") else "")
    return f"{arch}; exits@{','.join(map(str, net.get('exits', [])))}; {head}"


def markdown_table(front: list[dict], config: SearchConfig) -> str:
    lines = ["| trial | design (depths, channels; exit stages; head) | val acc | val MACs | test acc | test MACs | "
             "full MACs | params | repaired |",
             "|---:|---|---:|---:|---:|---:|---:|---:|:-:|"]
    for r in front:
        ta = f"{100 * r['test_accuracy']:.2f}%" if r.get("test_accuracy") is not None else "-"
        tm = _k(r["test_macs"]) if r.get("test_macs") is not None else "-"
        lines.append(f"| {r['number']} | {_describe(r['network'])} | {100 * r['val_accuracy']:.2f}% | "
                     f"{_k(r['val_macs'])} | {ta} | {tm} | {_k(r['full_macs'])} | {r['params']:,} | "
                     f"{'yes' if r.get('repaired') else ''} |")
    return "\n".join(lines)


def plot_trials(path: str | Path, records: list[dict], front: list[dict], config: SearchConfig, title: str = "") -> None:
    """Every trained trial (admissible ones coloured), the admissible front as a step line, and
    the two constraint lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r["state"] == "COMPLETE" and "val_accuracy" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    bad = [r for r in done if not r["admissible"]]
    ok = [r for r in done if r["admissible"]]
    if bad:
        ax.scatter([r["val_macs"] for r in bad], [100 * r["val_accuracy"] for r in bad], c="0.65", s=22,
                   label=f"violates a constraint ({len(bad)})")
    if ok:
        ax.scatter([r["val_macs"] for r in ok], [100 * r["val_accuracy"] for r in ok], c="tab:blue", s=26,
                   label=f"admissible ({len(ok)})")
    if front:
        xs = [r["val_macs"] for r in front]
        ys = [100 * r["val_accuracy"] for r in front]
        ax.step(xs, ys, where="post", c="tab:red", lw=1.4)
        ax.scatter(xs, ys, facecolors="none", edgecolors="tab:red", s=70, lw=1.4, label=f"Pareto front ({len(front)})")
        tx = [r.get("test_macs") for r in front]
        if all(v is not None for v in tx):
            ax.scatter(tx, [100 * r["test_accuracy"] for r in front], marker="x", c="tab:red", s=30,
                       label="front on the test split")
    ax.axhline(100 * config.accuracy_floor, c="tab:green", ls="--", lw=1, label="accuracy floor")
    ax.axvline(config.macs_ceiling, c="tab:purple", ls="--", lw=1, label="MAC ceiling")
    n_pruned = sum(r["state"] == "PRUNED" for r in records)
    counts = (f"{len(front)} on the admissible front, {len(ok)} admissible, {len(done)} complete, "
              f"{n_pruned} pruned (not shown)")
    ax.set_xlabel("expected MACs per sample (validation exit distribution, heads included)")
    ax.set_ylabel("validation accuracy after calibration (%)")
    ax.set_title(f"{title}\n{counts}" if title else counts, fontsize=9)
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _k(v) if v > 0 else "0"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out: str | Path, study, config: SearchConfig, records: list[dict], front: list[dict], message: str,
                 *, study_name: str = "", storage: str = "") -> dict[str, str]:
    """Write ``pareto.md``, ``pareto.json``, ``pareto.png`` and ``designs/trial_<n>.yaml``."""
    from ..io import dump_yaml

    out = Path(out)
    (out / "designs").mkdir(parents=True, exist_ok=True)
    files = {"markdown": str(out / "pareto.md"), "json": str(out / "pareto.json"), "plot": str(out / "pareto.png")}
    # this study's designs from an earlier report that the front no longer holds (another floor, say)
    mine = f"# eenn design search: study {study_name!r}, trial "
    on_front = {f"trial_{r['number']}.yaml" for r in front}
    for old in (out / "designs").glob("trial_*.yaml"):
        if old.name not in on_front:
            with open(old) as f:
                if f.readline().startswith(mine):
                    old.unlink()
    designs = {}
    for r in front:
        p = out / "designs" / f"trial_{r['number']}.yaml"
        body = design_config(r, config, study_name=study_name)
        header = (f"# eenn design search: study {study_name!r}, trial {r['number']}: validation accuracy "
                  f"{100 * r['val_accuracy']:.2f}% at {r['val_macs']:,.0f} expected MACs (proxy training).\n"
                  "# An eenn run config: retrain it with `eenn train --config THIS_FILE --out runs/NAME`.\n")
        p.write_text(header + dump_yaml(body))
        designs[r["number"]] = str(p)
    fl, ce = config.accuracy_floor, config.macs_ceiling
    md = [f"# Design search: {study_name}", "",
          f"Constraints on the validation split: accuracy >= {100 * fl:.2f}%, expected MACs <= {ce:,.0f} per sample.",
          f"Storage: `{storage}`. Sampler: {config.sampler}. Proxy training: {config.train.get('epochs')} epoch(s).", "",
          message, ""]
    if front:
        md += [markdown_table(front, config), "",
               "Test figures use the thresholds fitted on validation. Each design's full-training config: "
               "`designs/trial_<n>.yaml`."]
    (out / "pareto.md").write_text("\n".join(md) + "\n")
    keep = ("number", "params", "network", "val_accuracy", "val_macs", "test_accuracy", "test_macs", "full_macs",
            "params", "thresholds", "repaired", "val_exit_distribution", "test_exit_distribution", "val_final_accuracy",
            "test_final_accuracy", "train_seconds")
    doc = {"study": study_name, "storage": storage, "constraints": {"accuracy_floor": fl, "macs_ceiling": ce},
           "message": message, "feasible": bool(front),
           "trials": {"total": len(records), "complete": sum(r["state"] == "COMPLETE" for r in records),
                      "pruned": sum(r["state"] == "PRUNED" for r in records),
                      "failed": sum(r["state"] == "FAIL" for r in records),
                      "admissible": sum(r["admissible"] for r in records)},
           "pruned": [{"number": r["number"], "reason": r.get("pruned_reason")} for r in records if r["state"] == "PRUNED"],
           "front": [{**{k: r.get(k) for k in keep}, "config_file": designs[r["number"]]} for r in front]}
    (out / "pareto.json").write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    plot_trials(out / "pareto.png", records, front, config, title=f"design search {study_name!r}")
    files["designs"] = str(out / "designs")
    return files


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)
