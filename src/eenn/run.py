"""Runs: one directory per run holding everything needed to trust and re-make its numbers.

``<run>/``: ``config.yaml`` (the resolved :class:`~eenn.config.RunConfig`), ``run.json`` (the
exact command, date, host and package versions), ``metrics.jsonl``, ``last.safetensors`` and
``best.safetensors`` (from the trainer), ``report.json`` / ``report.md`` and ``curve.png`` /
``exits.png`` (from :func:`eenn.report.evaluate`).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .callbacks import Callback
from .checkpoint import load, read_description
from .config import ConfigError, RunConfig, check_config, config_from_dict, config_to_dict, read_yaml, save_config
from .data import load_dataset
from .network import MultiExitNetwork, create_network
from .objectives import GeometricEnsemble, ZTWEnsemble, create_objective
from .report import Report, evaluate

__all__ = ["build_data", "build_network", "train_run", "evaluate_run", "open_run", "run_info"]

PACKAGES = ("eenn", "torch", "numpy", "safetensors", "scikit-learn", "scipy", "matplotlib", "pyyaml", "optuna",
            "onnx", "onnxruntime", "ray")


def run_info(argv: list[str] | None = None) -> dict:
    """The command, date, machine and package versions of this process."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    versions["python"] = platform.python_version()
    commit, dirty = _git_state(Path(__file__).resolve().parent)
    from .report import _cpu_name

    return {
        "command": " ".join(["eenn", *(argv if argv is not None else sys.argv[1:])]),
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "cwd": os.getcwd(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "cpu": _cpu_name(), "cpus": os.cpu_count(),
                 "threads": torch.get_num_threads(),
                 "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "git_commit": commit,
        "git_dirty": dirty,
        "versions": versions,
    }


def _git_state(where: Path) -> tuple[str | None, bool | None]:
    """The commit of the git checkout holding ``where`` and whether its tracked files differ from
    it (``git status --porcelain``; untracked files, run outputs among them, do not count);
    (None, None) outside a checkout or without git."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=where)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = (git("rev-parse", "HEAD") or "").strip() or None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return commit, (None if status is None else bool(status.strip()))


def build_data(config: RunConfig):
    d = config.data
    return load_dataset(d.name, data_dir=d.data_dir, download=d.download, val_fraction=d.val_fraction,
                        seed=config.train.seed, limit=d.limit)


def build_network(config: RunConfig, info) -> MultiExitNetwork:
    m = config.model
    torch.manual_seed(config.train.seed)
    return create_network(m.backbone, in_channels=info.in_channels, num_classes=info.num_classes,
                          input_size=info.input_size, exits=m.exits, head=m.head, head_options=m.head_options,
                          **m.backbone_options)


def default_run_dir(config: RunConfig) -> str:
    return f"runs/{config.data.name}-{config.model.backbone}-{config.objective.name}"


def train_run(config: RunConfig, *, argv: list[str] | None = None, report: bool = True,
              callbacks=()) -> dict:
    """Train the run described by ``config`` in ``config.train.out_dir`` (resuming from its
    ``last.safetensors``), then evaluate its best checkpoint; returns ``{"dir", "history",
    "report", "epochs", "stopped"}`` (``history``: the epochs trained now; ``epochs``: the run's
    epochs done in all)."""
    from .trainer import Trainer

    check_config(config)
    if config.train.out_dir is None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, out_dir=default_run_dir(config)))
    out = Path(config.train.out_dir)
    data = build_data(config)
    net = build_network(config, data.info)
    objective = create_objective(config.objective.name, **config.objective.options)
    if config.train.resume:
        _check_resumable(out, config, data.info, objective)
    # the directory is made once training starts (_RunFiles, the trainer's own callbacks): a run
    # refused before that (an objective that does not fit the network, a checkpoint= that does
    # not load) leaves no empty run directory behind
    files = _RunFiles(config, out, argv)
    trainer = Trainer(config.train, callbacks=[*callbacks, files])
    history = trainer.fit(net, data, objective)
    # epochs: the run's, resumed ones included; stopped: whether early stopping (or a callback) ended it
    result = {"dir": str(out), "history": history, "report": None, "epochs": trainer.epoch + 1,
              "stopped": trainer.should_stop}
    if os.environ.get("RANK", "0") != "0":
        return result
    # ZTW's geometric ensemble is the objective's (its training state): the report answers with it
    ensemble = objective.ensemble if isinstance(objective, ZTWEnsemble) else None
    if report:
        best = load(out / "best.safetensors") if (out / "best.safetensors").exists() else net
        result["report"] = evaluate_run(best, data, with_ensemble(config, ensemble), out)
        if not files.trains:  # the record kept; its eval section is now that of the report just written
            _record_eval(out, config)
    if ensemble is not None:
        _store_ensemble(out, ensemble, result["report"])
    return result


def with_ensemble(config: RunConfig, ensemble) -> RunConfig:
    """``config`` whose evaluation answers with ZTW's learned geometric ``ensemble`` (a
    :class:`~eenn.objectives.GeometricEnsemble` or its ``{"weight", "bias"}``): a ``ztw_ensemble``
    run evaluated with ``max_prob`` (ZTW's rule: the ensemble's top probability) or ``ensemble``
    and no weights of its own gets the rule ``ensemble`` with ``ensemble=``; another rule
    (``entropy``, say) reads the exits themselves. ``config`` as it is otherwise."""
    e = config.eval
    if ensemble is None or config.objective.name != "ztw_ensemble" or e.policy not in ("max_prob", "ensemble") \
            or any(k in e.policy_options for k in ("weights", "ensemble")):
        return config
    parts = (ensemble.weight, ensemble.bias) if isinstance(ensemble, torch.nn.Module) else \
        (ensemble["weight"], ensemble["bias"])
    weight, bias = (torch.as_tensor(t, dtype=torch.float32).detach().cpu() for t in parts)
    frozen = GeometricEnsemble(*bias.shape)  # a copy on the CPU: [E, C] bias, [E, E] weight
    frozen.load_state_dict({"weight": weight, "bias": bias})
    return dataclasses.replace(config, eval=dataclasses.replace(
        e, policy="ensemble", policy_options={**e.policy_options, "ensemble": frozen.requires_grad_(False)}))


def stored_ensemble(checkpoint: str | Path) -> dict | None:
    """The ZTW ensemble a run stored in ``checkpoint`` with its exit policy (``{"weight",
    "bias"}`` tensors), or None."""
    from .io import decode_inf
    from .policies import ExitPolicy

    stored = read_description(checkpoint).get("policy")
    if not isinstance(stored, dict) or "ensemble" not in (stored.get("options") or {}):
        return None
    return ExitPolicy.from_dict(decode_inf(stored)).options["ensemble"]


def _store_ensemble(out: Path, ensemble, report: Report | None) -> None:
    """Keep a ztw_ensemble run's trained ensemble with its weights: ``best.safetensors`` (else
    ``last``) gets the exit policy ``ensemble`` holding it, with the report's thresholds when the
    report fitted that rule (then ``eenn predict`` and ``eenn export`` run it as it is), else
    unfitted (``eenn calibrate`` fits it); :func:`open_run` gives it to ``eenn evaluate`` and
    ``eenn calibrate``. The weights are not touched."""
    from .checkpoint import save
    from .policies import ExitPolicy

    path = next((out / n for n in ("best.safetensors", "last.safetensors") if (out / n).is_file()), None)
    if path is None:
        return
    policy = ExitPolicy("ensemble", ensemble=ensemble)
    if report is not None:
        fitted = ExitPolicy.from_dict(report.data)
        if fitted.name == "ensemble" and "ensemble" in fitted.options:
            policy = fitted
    desc, state = read_description(path), None
    if path.name == "last.safetensors":
        from .checkpoint import load_state

        _, state = load_state(path)
    save(load(path), path, extra=desc.get("extra"), state=state, policy=policy)


def _record_eval(out: Path, config: RunConfig) -> None:
    path = out / "config.yaml"
    if not path.is_file():
        return
    try:
        saved = config_from_dict(read_yaml(path))
    except ConfigError:
        return
    if saved.eval != config.eval:
        save_config(dataclasses.replace(saved, eval=config.eval), path)


class _RunFiles(Callback):
    """Writes the run's record once training starts (its weights built or resumed), on rank 0: a
    run refused before that (a checkpoint that does not fit, say) leaves the directory as it was.

    ``config.yaml`` is the config its weights were trained under, ``run.json`` the command that
    started the run; a resume that trains more epochs rewrites ``config.yaml`` (the settings it
    goes on under) and appends its own command, date and commit to ``run.json``'s ``"resumed"``
    list (with ``"from_epoch"``). A re-run that trains nothing (the run is finished) keeps both
    as they were: its other settings never reached the weights (the trainer says which changed);
    only ``config.yaml``'s ``eval`` section follows the report such a re-run writes."""

    def __init__(self, config: RunConfig, out: Path, argv: list[str] | None) -> None:
        self.config, self.out, self.argv = config, out, argv
        self.trains = True

    def on_fit_start(self, trainer) -> None:
        if os.environ.get("RANK", "0") != "0":
            return
        self.out.mkdir(parents=True, exist_ok=True)
        start = trainer.start_epoch
        self.trains = not trainer.should_stop and start < trainer.config.epochs
        if not self.trains and start:  # finished: the record describes the weights, and stays
            return
        info = run_info(self.argv)
        record = self.out / "run.json"
        if start and record.is_file():
            try:
                first = json.loads(record.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                first = None
            if isinstance(first, dict):  # the run's first command stays; this one is appended
                keep = ("command", "argv", "cwd", "date", "git_commit", "git_dirty")
                first.setdefault("resumed", []).append({"from_epoch": start, **{k: info.get(k) for k in keep}})
                info = first
        save_config(self.config, self.out / "config.yaml")
        record.write_text(json.dumps(info, indent=2))


def _differences(saved: Any, want: Any, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(want, dict):
        out = []
        for key in sorted(set(saved) | set(want), key=str):
            out += _differences(saved.get(key), want.get(key), f"{where}{key}.")
        return out
    return [] if saved == want else [f"{where.rstrip('.')}: {saved!r} -> {want!r}"]


# what a resumed run must keep: its data (train.seed picks the validation split), network,
# objective, and optimiser (whose saved state another one cannot take)
_FIXED_ON_RESUME = ("data", "model", "objective", "train.seed", "train.optimizer")


def _setting(values: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        values = values.get(key) if isinstance(values, dict) else None
    return values


def _check_resumable(out: Path, config: RunConfig, info=None, objective=None) -> None:
    """Refuse to resume ``out``'s training with other data, seed, network, objective or optimiser:
    the weights and state in ``last.safetensors`` belong to the run its ``config.yaml`` describes,
    and going on under another description would give a network that neither describes (with
    another seed, a validation split holding samples it was trained on). (Other training
    settings, more epochs say, may change: the trainer resumes and warns.) Without
    ``config.yaml`` (a directory ``eenn.fit(..., out_dir=)`` wrote), what the checkpoint records
    of its data, split and objective is held to, as the trainer does (``info``: the data's
    :class:`~eenn.data.DatasetInfo`, ``objective`` the one built)."""
    from .checkpoint import CheckpointError
    from .train_state import check_same_run

    last, saved_path = out / "last.safetensors", out / "config.yaml"
    if last.exists() and saved_path.exists():
        _check_config_yaml(out, config)
    if last.is_file() and info is not None and objective is not None:
        try:
            check_same_run(last, info, objective)
        except CheckpointError:
            raise  # a damaged file: the trainer's own message, as a file error
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _check_config_yaml(out: Path, config: RunConfig) -> None:
    last, saved_path = out / "last.safetensors", out / "config.yaml"
    saved, want = read_yaml(saved_path), config_to_dict(config)
    try:  # through the config class, so that settings added since with their defaults compare equal
        saved = config_to_dict(config_from_dict(saved))
    except ConfigError:
        pass
    diff = [d for k in _FIXED_ON_RESUME for d in _differences(_setting(saved, k), _setting(want, k), f"{k}.")]
    if diff:
        raise ConfigError(
            f"{out} holds a run trained with other settings ({'; '.join(diff[:6])}"
            f"{'; ...' if len(diff) > 6 else ''}), and resuming it would mix the two. Use the settings of "
            f"{saved_path}, choose another out_dir, or delete {last} to start again (train.resume=false "
            "starts again too)"
        )


def _fixed_gate(config: RunConfig, num_exits: int) -> float:
    """The method's own fixed gate threshold: 1/N after EENets' v3 loss, else 0.5."""
    if config.objective.name != "eenets":
        return 0.5
    from .objectives.eenets import confidence_threshold

    return confidence_threshold(str(config.objective.options.get("version", "v2")), num_exits)


def evaluate_run(net: MultiExitNetwork, data, config: RunConfig, out: str | Path | None) -> Report:
    e = config.eval
    report = evaluate(net, data, policy=e.policy, goal=e.goal, split=e.split, fallback=e.fallback,
                      batch_sizes=tuple(e.batch_sizes), timing_samples=e.timing_samples, repeats=e.repeats,
                      curve_points=e.curve_points, device=config.train.device, policy_options=e.policy_options,
                      deployments=e.deployments, fixed_gate=_fixed_gate(config, net.num_exits))
    report.data["run"] = {"objective": config.objective.name, "objective_options": config.objective.options}
    if out is not None:
        report.save(out)
    return report


def open_run(path: str | Path, model=None) -> tuple[MultiExitNetwork, RunConfig | None, Path]:
    """A trained network from a run directory (its best, else last, checkpoint) or a checkpoint
    file, with the run's config when there is one, and the directory reports go to. ``model``:
    for a network made by :func:`eenn.attach_exits`, as for :func:`eenn.load`."""
    p = Path(path)
    if p.is_dir():
        ckpt = next((p / n for n in ("best.safetensors", "last.safetensors") if (p / n).exists()), None)
        if ckpt is None:
            raise FileNotFoundError(f"{p} holds no best.safetensors or last.safetensors: is it a run directory?")
        run_dir = p
    elif p.is_file():
        ckpt, run_dir = p, p.parent
    else:
        raise FileNotFoundError(f"{p} is neither a run directory nor a checkpoint file")
    config = read_run_config(run_dir)
    if config is not None and config.objective.name == "ztw_ensemble":  # its learned ensemble, where stored
        config = with_ensemble(config, stored_ensemble(ckpt))
    return load(ckpt, model=model), config, run_dir


def read_run_config(run_dir: str | Path) -> RunConfig | None:
    """The run's ``config.yaml`` in ``run_dir``, checked; None where there is none."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return None
    dropped: list[str] = []
    try:
        config = config_from_dict(read_yaml(path), dropped=dropped)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if dropped:
        warnings.warn(f"{path} was written by an eenn with settings this one no longer has "
                      f"({', '.join(dropped)}); they are ignored", UserWarning, stacklevel=3)
    return config



def data_info_of(path: str | Path) -> dict[str, Any] | None:
    """The data set a trainer checkpoint names (``{"name": ...}``; older ones also hold its sizes,
    normalisation and class names, which the network's ``input_spec`` now carries)."""
    return read_description(path).get("extra", {}).get("data")
