"""The files of a staged ONNX export: the format's names, the manifest (read and its parts checked
against each other once, so that a hand edit or a truncated copy is refused with the field at
fault instead of failing in every request) and the segments' bytes. Running them is
:mod:`eenn.staged`; writing them, :mod:`eenn.exporter`."""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from .io import read_json
from .policies.policy import ExitPolicy

__all__ = ["ExportError", "load_manifest", "read_segments", "EXPORT_TOLERANCE", "FORMAT", "FORMAT_VERSION", "MANIFEST"]

FORMAT = "eenn.staged_onnx"
FORMAT_VERSION = 2  # 2: the policy record is ExitPolicy.to_dict() ("rule"); version 1 ("name") is still read
MANIFEST = "manifest.json"
EXPORT_TOLERANCE = 1e-4  # largest |ONNX logit - PyTorch logit| accepted at export time


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ExportError(ValueError):
    """An export that cannot be made or an exported model that cannot be read; says why."""


# ------------------------------------------------------------------------------------ manifest
def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an exported model (``path``: its directory or ``manifest.json``), its
    parts checked against each other (:func:`_check_manifest`)."""
    given = Path(path)
    p = given / MANIFEST if given.is_dir() else given
    if not p.is_file():
        where = given if given.is_dir() or given.name != MANIFEST else given.parent
        raise ExportError(f"no exported model at {where} (missing {MANIFEST}); run `eenn export` first")
    try:
        m = read_json(p)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ExportError(f"{p}: not an eenn staged export (format "
                          f"{m.get('format') if isinstance(m, dict) else None!r})")
    version = m.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ExportError(f"{MANIFEST} of {p.parent}: `format_version` must be an integer, got {version!r}; "
                          "re-export the model")
    if version > FORMAT_VERSION:
        raise ExportError(f"{p} was written by a newer eenn ({m.get('eenn_version')}); upgrade eenn to read it")
    _check_manifest(m, p.parent)
    m["_dir"] = str(p.parent)
    return m


_SEGMENT_KEYS = ("index", "file", "sha256", "inputs", "outputs", "num_state_outputs", "cascade", "macs")


def _check_manifest(m: dict[str, Any], where: Path) -> None:
    """Refuse a manifest whose parts disagree (a hand edit, a truncated copy) once, when it is
    read, instead of failing in every request: the counts, the segments, the input shape, the
    class names, the normalisation, the policy and the validation record."""
    def bad(what: str) -> ExportError:
        return ExportError(f"{MANIFEST} of {where}: {what}; re-export the model")

    def number(v: Any) -> bool:
        return not isinstance(v, bool) and (isinstance(v, int) or isinstance(v, float) and math.isfinite(v))

    counts = {}
    for key in ("num_exits", "num_classes"):
        v = m.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise bad(f"`{key}` must be an integer >= 1, got {v!r}")
        counts[key] = v
    E, C = counts["num_exits"], counts["num_classes"]
    shape = m.get("input_shape")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise bad(f"`input_shape` must be a list of positive integers, got {shape!r}")
    if not isinstance(m.get("has_gates"), bool):
        raise bad(f"`has_gates` must be true or false, got {m.get('has_gates')!r}")
    segs = m.get("segments")
    if not isinstance(segs, list) or len(segs) != E:
        got = f"{len(segs)} entries" if isinstance(segs, list) else "none" if segs is None else repr(segs)
        raise bad(f"`segments` must list one entry per exit ({E}, num_exits), got {got}")
    for k, seg in enumerate(segs):
        if not isinstance(seg, dict) or seg.get("index") != k:
            raise bad(f"segment entry {k} must be a record with `index` {k}, got "
                      f"{seg.get('index') if isinstance(seg, dict) else seg!r}")
        missing = [key for key in _SEGMENT_KEYS if key not in seg]
        if missing:
            raise bad(f"segment {k} lacks {', '.join(missing)}")
    first = segs[0]["inputs"]
    if not (isinstance(first, list) and first and isinstance(first[0], dict) and isinstance(first[0].get("shape"), list)):
        raise bad(f"segment 0's `inputs` must describe the model input, got {first!r}")
    if first[0]["shape"][1:] != shape:
        raise bad(f"`input_shape` {shape} does not match segment 0's input {first[0]['shape'][1:]}")
    names = m.get("exit_names")
    if not isinstance(names, list) or len(names) != E:
        raise bad(f"`exit_names` must list {E} names (num_exits), got {names!r}")
    classes = m.get("class_names")
    if classes is not None and (not isinstance(classes, list) or len(classes) != C):
        got = f"{len(classes)} names" if isinstance(classes, list) else repr(classes)
        raise bad(f"`class_names` must list {C} names (num_classes) or be null, got {got}")
    pre = m.get("preprocess")
    if pre is not None:
        if not isinstance(pre, dict):
            raise bad(f"`preprocess` must be a record of `mean` and `std` or null, got {pre!r}")
        channels = shape[0]
        for key in ("mean", "std"):
            v = pre.get(key)
            vals = v if isinstance(v, list) else [v]
            if len(vals) not in (1, channels) or not all(number(x) for x in vals):
                many = "1 number" if channels == 1 else f"1 or {channels} numbers"
                raise bad(f"`preprocess.{key}` must be {many} (per channel of input_shape {shape}), got {v!r}")
            if key == "std" and min(vals) <= 0:
                raise bad(f"`preprocess.std` must be > 0, got {v!r}")
    try:
        if not isinstance(m.get("policy"), dict):
            raise ValueError(f"got {m.get('policy')!r}")
        ExitPolicy.from_dict(m["policy"])
    except (ValueError, KeyError, TypeError) as e:
        raise bad(f"`policy` is not an exit policy record ({e})") from None
    val = m.get("validation")
    if val is not None and not isinstance(val, dict):
        raise bad(f"`validation` must be a record or null, got {val!r}")
    depth = (val or {}).get("depth_distribution")
    if depth is not None and (not isinstance(depth, list) or len(depth) != E
                              or not all(number(p) and p >= 0 for p in depth)):
        raise bad(f"`validation.depth_distribution` must be {E} shares >= 0 (num_exits), got {depth!r}")


def read_segments(manifest: dict[str, Any], segments: tuple[int, int]) -> dict[int | str, bytes]:
    """The ONNX bytes of segments ``a..b-1`` of an exported model, by index; for the whole model,
    also the static graph's, under ``"static"`` (where the export has one): a runner serving the
    network whole under a policy that lets nobody leave early runs that instead."""
    base = Path(manifest["_dir"])
    out: dict[int | str, bytes] = {s["index"]: (base / s["file"]).read_bytes()
                                   for s in manifest["segments"][segments[0]:segments[1]]}
    static = manifest.get("static") or {}
    if tuple(segments) == (0, int(manifest["num_exits"])) and static.get("file") and (base / static["file"]).exists():
        out["static"] = (base / static["file"]).read_bytes()
    return out


NO_PREPROCESS = ("this model was exported without an input description (its manifest has no \"preprocess\" mean/std), "
                 "so pixels cannot be turned into its inputs: send float model inputs, or export a network whose "
                 "input_spec is set")


def normalise_pixels(px, manifest: dict):
    """uint8 pixels [B, C, H, W] (a NumPy array) -> float32 ``(x/255 - mean)/std`` with the exported
    statistics, by :meth:`eenn.InputSpec.normalize` itself (the arithmetic of
    :class:`eenn.TensorLoader` and ``net.preprocess``), so that an exported model's runner and
    server give a pixel bit for bit the input the evaluation gave it. A ValueError
    (:data:`NO_PREPROCESS`) where the manifest has no statistics."""
    import numpy as np
    import torch

    pre = manifest.get("preprocess")
    if not pre:
        raise ValueError(NO_PREPROCESS)
    spec = _pixel_spec(tuple(px.shape[1:]), tuple(np.ravel(pre["mean"]).tolist()), tuple(np.ravel(pre["std"]).tolist()))
    return spec.normalize(torch.from_numpy(np.require(px, requirements=["C", "W"]))).numpy()


@functools.lru_cache(maxsize=16)
def _pixel_spec(shape: tuple, mean: tuple, std: tuple):
    """The model's input description, made once per model: it keeps its normalisation factors."""
    from .data.spec import InputSpec

    return InputSpec(shape, mean, std)
