"""What the trainer checks before it trains: that the data fit the network (their kind and shape,
the network's input description, labels it has classes for) and, on a resume, the saved training
state before restoring anything from it: each field there and of its kind, what fails to restore
said as a :class:`~eenn.checkpoint.CheckpointError` naming the file and the field, optimiser
buffers of their parameter's shape, the data of the kind the saved network was trained on; and
each rank's random-number state taken back."""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .data import InputSpec
from .registry import is_whole
from .rng import set_rng_state
from .userframe import caller_stacklevel

__all__ = ["batch_norm_drop_last", "check_labels", "check_optimizer_state", "check_resumed_input", "check_same_run", "checked_state",
           "claim_input_spec", "resume_message", "restore_rng", "restoring"]


# What a resume reads from the saved training state before restoring anything: each field's test
# (given the run's saved number of epochs) and what it must be, in words.
_STATE_FIELDS: dict[str, tuple] = {
    "epoch": (lambda v, epochs: is_whole(v, 0) and v <= epochs, "the number of epochs done, from 0 to {epochs}"),
    "config": (lambda v, _: isinstance(v, dict), "a mapping of training settings"),
    "optimizer": (lambda v, _: isinstance(v, dict), "an optimiser state (a mapping)"),
    "scheduler": (lambda v, _: isinstance(v, dict), "a schedule state (a mapping)"),
    "objective": (lambda v, _: isinstance(v, dict), "an objective state (a mapping)"),
    "callbacks": (lambda v, _: isinstance(v, dict), "a mapping of callback states"),
    "rng": (lambda v, _: isinstance(v, dict), "a mapping of random-number states"),
}


def checked_state(state: Any, path: Path, epochs: int) -> dict[str, Any]:
    """The saved training settings, once every field a resume reads is there and of its kind
    (``epochs``: the run's, where the saved settings do not say)."""
    from .checkpoint import CheckpointError

    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the training state must be a mapping, got {type(state).__name__}; the file "
                              "was edited or damaged: delete it (or set resume=False) to start again")
    saved = state.get("config")
    if isinstance(saved, dict) and is_whole(saved.get("epochs"), 1):
        epochs = saved["epochs"]
    for field, (ok, allowed) in _STATE_FIELDS.items():
        if not ok(state.get(field), epochs):
            raise CheckpointError(f"{path}: the training state's {field} must be {allowed.format(epochs=epochs)}, got "
                                  f"{_short(state.get(field))}; the file was edited or damaged: delete it (or set "
                                  "resume=False) to start again")
    return saved


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@contextlib.contextmanager
def restoring(path: Path, field: str):
    """Restore one part of the training state; what fails is said as a CheckpointError naming the
    file and the field."""
    from .checkpoint import CheckpointError

    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        why = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
        raise CheckpointError(f"{path}: the training state's {field} cannot be restored ({type(e).__name__}: "
                              f"{why}); the file was edited or damaged: delete it (or set resume=False) to start "
                              "again") from None


def check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Refuse per-parameter buffers (momentum, Adam's moments) of another shape than their
    parameter's: loading does not look, and the first step would fail mid-epoch."""
    for p, buffers in optimizer.state.items():
        for name, v in buffers.items():
            if isinstance(v, Tensor) and v.dim() and v.shape != p.shape:
                raise ValueError(f"{name} of shape {tuple(v.shape)} for a parameter of shape {tuple(p.shape)}")


def restore_rng(state: dict[str, Any], path: Path, env, seed: int) -> None:
    """Each rank takes back its own RNG state. A checkpoint written by a different number of
    processes has no state for some ranks: those are re-seeded per rank and epoch (the run goes
    on, but not as the uninterrupted one would have). ``env``: the run's
    :class:`~eenn.distributed.DistEnv`."""
    ranks = state.get("rng_ranks") or [state["rng"]]
    if len(ranks) == env.world_size:
        set_rng_state(ranks[env.rank])
        return
    if env.is_main:
        warnings.warn(f"{path} was written by {len(ranks)} process(es), this run has {env.world_size}: "
                      "ranks without a saved RNG state are re-seeded", stacklevel=caller_stacklevel())
    if env.rank < len(ranks):
        set_rng_state(ranks[env.rank])
    else:
        torch.manual_seed(seed + env.rank + 1_000_003 * int(state["epoch"]))


# ------------------------------------------------------------------------- the data

def claim_input_spec(net, info) -> InputSpec:
    """Give ``net`` the input description of the data it is trained on (``info``, a
    :class:`~eenn.data.DatasetInfo`), or check that the one it has is that one. Data of another
    kind than the network takes (token ids for a network of float inputs, say) are refused."""
    spec = _class_names(net, info, InputSpec.from_info(info))
    ids = net.takes_token_ids
    if ids != (spec.kind == "tokens"):
        takes = (f"token ids (it was traced with input_dtype={net.backbone.input_dtype})" if ids else
                 "float inputs (a network of token ids is made with eenn.attach_exits(..., input_dtype=torch.long))")
        raise ValueError(f"the network takes {takes}; the data set {info.name!r} holds {spec.describe()}: train it "
                         "on data of the kind it takes")
    if spec.kind != "pixels" and tuple(net.input_shape) != spec.shape:
        raise ValueError(f"the network takes inputs of shape {tuple(net.input_shape)} per sample (its input_shape); "
                         f"the data set {info.name!r} holds {spec.describe()}: pad or cut the samples to that shape")
    if net.input_spec is None:
        net.input_spec = spec
    elif not net.input_spec.same_input(spec):
        have = net.input_spec
        if not have.kind == spec.kind == "pixels":
            raise ValueError(
                f"the network's input description (net.input_spec) says it takes {have.describe()}; the data set "
                f"{info.name!r} it is asked to train on holds {spec.describe()}: train it on data of the kind it was "
                "trained on, or set net.input_spec = None to adopt this data set's description")
        raise ValueError(
            f"the network's input description (shape {have.shape}, mean {have.mean}, std {have.std}) is not "
            f"that of the data set {info.name!r} it is asked to train on (shape {spec.shape}, mean {spec.mean}, "
            f"std {spec.std}): train it on data normalised as before, or set net.input_spec = None to "
            "adopt this data set's statistics")
    return net.input_spec


def _class_names(net, info, spec: InputSpec) -> InputSpec:
    """``spec`` with one class name per class of the network, so that an export (whose runner
    reads one name per class) and a report name every class: fewer names than the network has
    classes are refused; of more (labels that fit, checked by :func:`check_labels`), the
    network's first classes' names are kept, label i being class i."""
    names, m = spec.class_names, net.num_classes
    if names is None or len(names) == m:
        return spec
    if len(names) < m:
        raise ValueError(f"the data set {info.name!r} names {len(names)} classes, the network has {m}: give "
                         f"num_classes={m} to from_tensors (or class_names of {m} names), or build the network "
                         f"with num_classes={len(names)}")
    return dataclasses.replace(spec, class_names=names[:m])


def batch_norm_drop_last(net, n_train: int, batch_size: int, env=None) -> bool:
    """Whether the training loader must drop a trailing batch of one sample: a BatchNorm layer
    in training takes its statistics over the batch, and one sample has none (torch fails
    mid-epoch, deep in the layer). Then also: a batch size of 1, or a training split of one
    sample (per process, under ``env``, a :class:`~eenn.distributed.DistEnv`), refused here. Under
    DDP the loader drops every partial batch anyway."""
    world = env.world_size if env is not None else 1
    norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    if norm and batch_size == 1:
        raise ValueError("batch_size=1 cannot train a network with BatchNorm layers (their statistics need 2 or "
                         "more samples per batch): give batch_size >= 2")
    per_rank = -(-n_train // world)
    if norm and per_rank == 1:
        raise ValueError(f"the training split holds {n_train} sample(s), one per batch, and the network has "
                         "BatchNorm layers, whose statistics need 2 or more samples per batch: train on more samples")
    return world > 1 or (norm and per_rank % batch_size == 1)


def check_labels(net, data) -> None:
    """Labels the network has no class for would fail mid-epoch (on a GPU, as a device-side
    assertion): refused here, naming the split."""
    for split in ("train", "val"):
        y = getattr(data, split).y
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= net.num_classes):
            raise ValueError(f"the {split} split's labels range over [{int(y.min())}, {int(y.max())}], the network "
                             f"has {net.num_classes} classes (0..{net.num_classes - 1}): build it with "
                             "num_classes covering every label")


def check_resumed_input(spec: InputSpec, path: Path) -> None:
    """A run goes on only on data of the kind and shape its saved network was trained on."""
    from .checkpoint import CheckpointError, read_description

    saved = (read_description(path).get("network") or {}).get("input_spec")
    if saved is None:
        return
    try:
        have = InputSpec.from_dict(saved)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: network.input_spec is not an input description ({type(e).__name__}: {e}); "
                              "the file was edited or damaged: delete it (or set resume=False) to start again") from None
    if (have.kind, have.shape) != (spec.kind, spec.shape):
        raise ValueError(f"{path} was trained on {have.describe()}, this run's data hold {spec.describe()}: resume "
                         "on the data it was trained on, choose another out_dir, or set resume=False to start again")


# ------------------------------------------------------------------------- the same run

def _changes(saved: dict, new: dict) -> list[str]:
    """``key: old -> new`` for the keys both record with other values."""
    return [f"{k}: {saved[k]!r} -> {new[k]!r}" for k in saved if k in new and saved[k] != new[k]]


def check_same_run(path: Path, info, objective, spec: InputSpec | None = None) -> None:
    """Refuse to resume the run saved in ``path`` on other data, another split of them (seed,
    val_fraction, limit: a validation split holding samples it was trained on) or with another
    objective (name, and options where both record them), before anything is restored or
    written. Reads what the checkpoint itself records, so that a run directory without
    ``config.yaml`` (``eenn.fit(..., out_dir=)``) is held to it too; older checkpoints that do
    not record a part are not checked on it. ``info``: the :class:`~eenn.data.DatasetInfo`;
    ``spec``: the network's input description, checked by :func:`check_resumed_input`."""
    from .checkpoint import read_description
    from .objectives.base import describe_objective

    if spec is not None:
        check_resumed_input(spec, path)

    desc = read_description(path)
    diff: list[str] = []
    data = (desc.get("extra") or {}).get("data")
    if isinstance(data, dict) and data.get("name") is not None:
        split, new_split = data.get("split"), getattr(info, "split", None)
        diff += [f"data set {data['name']!r} -> {info.name!r}"] if data["name"] != info.name else []
        if isinstance(split, dict) and isinstance(new_split, dict):
            diff += [f"data.{d}" for d in _changes(split, dict(new_split))]
    saved = (desc.get("state") or {}).get("objective_spec")
    if isinstance(saved, dict) and saved.get("name") is not None:
        new = describe_objective(objective)
        if saved["name"] != new["name"]:
            diff.append(f"objective {saved['name']!r} -> {new['name']!r}")
        elif isinstance(saved.get("options"), dict) and isinstance(new.get("options"), dict):
            diff += [f"objective option {d}" for d in _changes(saved["options"], new["options"])]
    if diff:
        raise ValueError(f"{path} was trained with other data or another objective ({'; '.join(diff)}): a resumed "
                         "run keeps its data, validation split (another would hold samples it was trained on) and "
                         "objective; resume with those, choose another out_dir, or set resume=False "
                         "(train.resume=false) to start again")


def resume_message(path: Path, changed: list[str], how: str, done: int, epochs: int, callbacks) -> str | None:
    """What a resume says about settings that changed: applied from here on, or, when the run has
    nothing left to train (``done`` of ``epochs``, or stopped early by one of ``callbacks``), not
    applied at all."""
    from .callbacks import EarlyStopping

    if not changed:
        return None
    stopped = any(isinstance(cb, EarlyStopping) and cb.stopped for cb in callbacks)
    if done >= epochs or stopped:
        return (f"{path} is finished ({done} epoch(s) done{', stopped early' if stopped else ''}): nothing is trained "
                f"now, so the changed settings ({'; '.join(changed)}) do not apply to its weights, and the run's "
                "record keeps its own (config.yaml's training settings, run.json's command); raise epochs to train "
                "on under them, or choose another out_dir")
    return (f"resuming {path} with changed settings ({'; '.join(changed)}); the optimiser's state is kept, with the "
            f"new weight decay and momentum, and {how}")
