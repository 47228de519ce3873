"""Checkpoints: one ``.safetensors`` file holding the weights and, in its header, a JSON
description from which the network is rebuilt without the script that trained it.

Writes are atomic (a temporary file in the same folder, fsync, then rename), so a crash never
leaves a half-written checkpoint where a good one was. Nothing is ever unpickled. A SHA-256 of
the tensor bytes is stored and checked, so a file damaged after its header is refused too.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .io import encode_inf
from .devices import usable_device
from .registry import is_whole
from .state_codec import STATE_PREFIX, dedupe, flatten_state, unflatten_state
from .user_model import import_model

__all__ = ["CheckpointError", "ModelRequired", "import_model", "save", "load", "load_state", "load_weights",
           "read_checkpoint", "read_description", "weights_digest"]

FORMAT = "eenn.multi_exit_network"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message says why and what to do."""


class ModelRequired(CheckpointError):
    """A network made by :func:`eenn.attach_exits` loaded without its user model (``model=`` in
    Python; ``summary`` is the command line's wording, ``--model``)."""

    def __init__(self, path: Path, model_class: str | None) -> None:
        what = f"{path} holds a network made by eenn.attach_exits on a user model ({model_class or 'unnamed'}); " \
               "its code is not stored with the weights"
        super().__init__(f"{what}: pass model=<a fresh instance of that model> (or model='MODULE:FUNCTION')")
        self.summary = (f"{what}: give --model MODULE:FUNCTION, a function or class of yours that returns a fresh "
                        "instance of it (e.g. --model mymodels:make_net, run from the folder holding mymodels.py)")


def _checked_policy(net: nn.Module, policy: Any) -> dict[str, Any]:
    """The record of ``policy`` once it fits ``net`` (its exit count and gates, thresholds
    fitted), checked by the policy's own ``bind`` as the engine and the exporter check it."""
    if isinstance(policy, str):
        raise TypeError(f"eenn.save: policy={policy!r} is a rule name without thresholds; save a fitted policy: "
                        f"eenn.ExitPolicy({policy!r}, thresholds) or one from eenn.calibrate(...)")
    if not callable(getattr(policy, "bind", None)) or not callable(getattr(policy, "to_dict", None)):
        raise TypeError(f"eenn.save: policy must be an eenn.ExitPolicy (e.g. from eenn.calibrate), got "
                        f"{type(policy).__name__}")
    try:
        policy.bind(net.num_exits, has_gates=net.has_gates)
    except ValueError as e:
        raise ValueError(f"eenn.save: the policy does not fit this network ({net.num_exits} exits): {e}") from None
    return encode_inf(policy.to_dict())  # strict JSON: infinite thresholds as "inf"


def _version() -> str:
    from . import __version__

    return __version__


def _digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_digest(net: nn.Module) -> str:
    """The identity of ``net``'s weights: the ``sha256`` that a checkpoint of them saved without a
    training state stores (``best.safetensors``; a ``last`` one also hashes its training state)."""
    return _digest(dedupe(net.state_dict())[0])


def save(
    net: nn.Module, path: str | os.PathLike, *, extra: dict[str, Any] | None = None, state: Any = None,
    policy: Any = None,
) -> Path:
    """Write ``net`` (a :class:`~eenn.MultiExitNetwork`) to ``path``; ``extra`` is any JSON-able
    data stored beside the description (metrics, training config, ...); ``state`` is a nested
    training state (dicts, lists, tensors: optimiser, scheduler, RNG) read back by
    :func:`load_state`, in the same file so that weights and state can never disagree;
    ``policy`` an :class:`~eenn.ExitPolicy` (e.g. from :func:`eenn.calibrate`) kept with the
    weights, read back by :meth:`eenn.ExitPolicy.load`."""
    from safetensors.torch import save_file

    from .network import MultiExitNetwork

    if not isinstance(net, MultiExitNetwork):
        raise TypeError(f"eenn.save takes a MultiExitNetwork, got {type(net).__name__}")
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give a file name such as {path / 'model.safetensors'}")
    record = _checked_policy(net, policy) if policy is not None else None
    tensors, aliases = dedupe(net.state_dict())
    try:
        state_tree = flatten_state(state, tensors, "root") if state is not None else None
    except TypeError as e:
        raise CheckpointError(str(e)) from None
    desc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "eenn_version": _version(),
        "torch_version": torch.__version__,
        "network": net.config,
        "aliases": aliases,
        "sha256": _digest(tensors),
        "extra": extra or {},
        "state": state_tree,
    }
    if record is not None:
        desc["policy"] = record
    try:
        text = json.dumps(desc)
    except TypeError as e:
        raise CheckpointError(f"cannot save: the description or `extra` is not JSON-serialisable ({e})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    # created as the run's other files are (the umask's permissions, not mkstemp's 0600)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = tmp.stat().st_mode & 0o777
        save_file(tensors, str(tmp), metadata={"eenn": text})
        os.chmod(tmp, mode)  # safetensors writes its files 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _remove_stale_temporaries(path: Path) -> None:
    """Delete what earlier saves of ``path`` killed mid-write left behind (full-size hidden
    ``.NAME.*.tmp`` files); nothing else is touched."""
    for stale in glob.glob(os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*.tmp")):
        if os.path.isfile(stale) and not os.path.islink(stale):
            Path(stale).unlink(missing_ok=True)


def _open_header(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for any malformed header
        raise CheckpointError(
            f"{path} is not a readable safetensors checkpoint (truncated or corrupted?): {e}. "
            "Re-save it or use another copy."
        ) from None
    if "eenn" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not an eenn checkpoint (no 'eenn' description)")
    try:
        desc = json.loads(meta["eenn"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the stored description is not valid JSON ({e})") from None
    if desc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {desc.get('format')!r}")
    version = desc.get("format_version", 0)
    if not is_whole(version, 0):
        raise CheckpointError(f"{path}: format_version must be a whole number, got {version!r}; the file was edited "
                              "or damaged: re-save it or use another copy")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer eenn ({desc.get('eenn_version')}, format "
            f"{desc['format_version']}); upgrade eenn to read it"
        )
    return desc


def read_description(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON description stored in a checkpoint (no weights are read)."""
    return _open_header(Path(path))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The description and every tensor of a checkpoint, checksum verified."""
    from safetensors.torch import load_file

    path = Path(path)
    desc = _open_header(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: the weights cannot be read (truncated or corrupted?): {e}") from None
    if _digest(tensors) != desc.get("sha256"):
        raise CheckpointError(f"{path}: the weights do not match their checksum; the file is corrupted")
    return desc, tensors


def load_state(path: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """The ``extra`` data and the training ``state`` saved with :func:`save` (state is None if
    none was saved)."""
    desc, tensors = read_checkpoint(Path(path))
    tree = desc.get("state")
    try:
        return desc.get("extra", {}), (unflatten_state(tree, tensors) if tree is not None else None)
    except KeyError as e:  # a tensor reference the file does not hold
        raise CheckpointError(f"{path}: the training state refers to the tensor {e.args[0]!r}, which the file does "
                              "not hold; the file was edited or damaged: delete it to start again") from None
    except (TypeError, ValueError) as e:  # a tagged entry (tuple, items, array) that is not one
        raise CheckpointError(f"{path}: the training state holds a malformed entry ({e}); the file was edited or "
                              "damaged: delete it to start again") from None


def _stored_weights(desc: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The network's tensors in a checkpoint, shared ones under each of their names."""
    state = {k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)}
    for alias, name in desc.get("aliases", {}).items():
        if name in tensors:
            state[alias] = tensors[name]
    return state


def _misfit(expected: dict[str, Tensor], state: dict[str, Tensor]) -> str:
    """What keeps ``state`` from loading into a network whose ``state_dict()`` is ``expected``
    ("" when nothing does)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            parts.append(f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
    return "; ".join(parts)


def _load_into(net: nn.Module, desc: dict[str, Any], tensors: dict[str, Tensor], path: Path) -> None:
    state = _stored_weights(desc, tensors)
    misfit = _misfit(net.state_dict(), state)
    if misfit:
        raise CheckpointError(f"{path} does not fit the network ({misfit})")
    net.load_state_dict(state)


def load_weights(net: nn.Module, path: str | os.PathLike) -> None:
    """Load the weights of checkpoint ``path`` into an existing ``net`` of the same design."""
    desc, tensors = read_checkpoint(path)
    _load_into(net, desc, tensors, Path(path))


def load(
    path: str | os.PathLike,
    *,
    model: nn.Module | str | None = None,
    leaf_modules: Sequence[type] | None = None,
    map_location: str | torch.device = "cpu",
):
    """Rebuild the network described in ``path`` and load its weights.

    For a network made by :func:`eenn.attach_exits`, pass a fresh instance of the same user
    model as ``model``, or ``"module:function"`` naming code of yours that builds one (see
    :func:`import_model`; code is never loaded from the checkpoint).

    The network comes back in eval mode, ready for the engine, export and serving (which refuse
    one in training mode); ``eenn.fit`` switches it to training mode itself, and ``.train()``
    does so for a loop of your own."""
    path = Path(path)
    map_location = usable_device(map_location, "map_location")
    desc, tensors = read_checkpoint(path)
    _check_network(desc.get("network"), path)
    source = desc["network"].get("source") or {}
    if source.get("kind") == "traced" and model is None:
        raise ModelRequired(path, source.get("model_class"))
    if isinstance(model, str):
        model = import_model(model)
    if source.get("kind") == "backbone":
        _check_sizes(desc, tensors, path)
    net = _rebuild(desc["network"], path, model=model, leaf_modules=leaf_modules)
    _load_into(net, desc, tensors, path)
    if net.input_spec is None:
        net.input_spec = _legacy_input_spec(desc)
    return net.to(map_location).eval()


def _rebuild(network: dict[str, Any], path: Path, **kw: Any) -> nn.Module:
    """``MultiExitNetwork.from_config``, its errors about the description said as such."""
    from .network import MultiExitNetwork

    try:
        return MultiExitNetwork.from_config(network, **kw)
    except KeyError as e:
        what = e.args[0] if e.args else ""
        if isinstance(what, str) and what.isidentifier():  # a field's name: the description lacks it
            raise CheckpointError(f"{path}: the network description lacks the field {what!r}; the file was edited "
                                  "or damaged: re-save the network with eenn.save") from None
        # a registry's message (an unknown backbone or head, with the names there are)
        raise CheckpointError(f"{path}: the network description does not rebuild: {what}; the file was edited or "
                              "damaged, or needs the code that registers that name") from None
    except TypeError as e:  # a wrong type _check_network does not look at (a backbone option, say)
        raise CheckpointError(f"{path}: the network description does not rebuild: {e}") from None


def _check_sizes(desc: dict[str, Any], tensors: dict[str, Tensor], path: Path) -> None:
    """Refuse a description whose sizes (classes, widths, ...) are not those of the stored weights
    before anything is allocated: the network is built on the meta device (shapes, no memory)
    and its tensors' shapes compared with the file's. A network whose code cannot be built there
    (one that reads a tensor's value while it is built) is not checked here."""
    try:
        with torch.device("meta"):
            net = _rebuild(desc["network"], path)
    except (RuntimeError, NotImplementedError) as e:
        if "meta" in str(e):  # not buildable without memory: the real build checks the shapes
            return
        raise CheckpointError(f"{path}: the network description does not rebuild ({' '.join(str(e).split())}); "
                              "the file was edited or damaged: re-save the network with eenn.save") from None
    misfit = _misfit(net.state_dict(), _stored_weights(desc, tensors))
    if misfit:
        raise CheckpointError(f"{path}: the network description does not match the stored weights ({misfit}); the "
                              "file was edited or damaged: re-save the network with eenn.save")


# at most this many input values per sample (3 x 4096 x 4096 fits): a description asking for more
# was edited, and building it would allocate the probe input of that size
_MAX_INPUT_VALUES = 2**26

# Fields of a network description (MultiExitNetwork.config) that a hand edit may break: what each
# must be, as a test and in words. Fields absent here, or absent from the file, are not checked.
_FIELDS: dict[str, tuple] = {
    "num_classes": (lambda v: is_whole(v, 2), "an int >= 2"),
    "input_shape": (lambda v: isinstance(v, list) and bool(v) and all(is_whole(s, 1) for s in v)
                    and math.prod(v) <= _MAX_INPUT_VALUES, "a list of ints >= 1, at most 2**26 values in all"),
    "exits": (lambda v: isinstance(v, list) and all(is_whole(s, 0) for s in v), "a list of stage indices"),
    "head": (lambda v: isinstance(v, list) and all(isinstance(h, str) for h in v), "a list of head names"),
    "head_options": (lambda v: isinstance(v, list) and all(isinstance(o, dict) for o in v), "a list of mappings"),
    "truncated_at": (lambda v: v is None or is_whole(v, 0), "an exit index"),
    "source": (lambda v: isinstance(v, dict), "a mapping"),
    "input_spec": (lambda v: v is None or isinstance(v, dict), "a mapping"),
    "source.name": (lambda v: isinstance(v, str), "a backbone name"),
    "source.in_channels": (lambda v: is_whole(v, 1), "an int >= 1"),
    "source.num_classes": (lambda v: is_whole(v, 2), "an int >= 2"),
    "source.input_size": (lambda v: isinstance(v, list) and len(v) == 2 and all(is_whole(s, 1) for s in v)
                          and math.prod(v) <= _MAX_INPUT_VALUES, "[height, width], ints >= 1, at most 2**26 pixels"),
    "source.options": (lambda v: isinstance(v, dict), "a mapping of backbone options"),
}


def _check_network(network: Any, path: Path) -> None:
    """Refuse a network description that a hand edit broke, naming the field."""
    if not isinstance(network, dict):
        raise CheckpointError(f"{path}: the description has no 'network' mapping (the network's design), got "
                              f"{type(network).__name__}; the file was edited or damaged: re-save the network "
                              "with eenn.save")
    for key, (ok, allowed) in _FIELDS.items():
        where, _, name = key.rpartition(".")
        parent = network.get(where) if where else network
        if isinstance(parent, dict) and name in parent and not ok(parent[name]):
            raise CheckpointError(f"{path}: network.{key} must be {allowed}, got {parent[name]!r}; the file was "
                                  "edited or damaged: fix the field or re-save the network with eenn.save")
    if network.get("input_spec") is not None:
        from .data.spec import InputSpec

        try:
            InputSpec.from_dict(network["input_spec"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: network.input_spec is not an input description "
                                  f"({type(e).__name__}: {e})") from None


def _legacy_input_spec(desc: dict[str, Any]):
    """The input description of a trainer checkpoint written before networks carried one (its
    ``extra["data"]`` held the data set's sizes, mean/std and class names), else None."""
    from .data.spec import InputSpec

    info = (desc.get("extra") or {}).get("data") or {}
    if not all(k in info for k in ("in_channels", "input_size", "mean", "std")):
        return None
    try:
        return InputSpec((info["in_channels"], *info["input_size"]), tuple(info["mean"]), tuple(info["std"]),
                         info.get("class_names"))
    except (TypeError, ValueError):
        return None
