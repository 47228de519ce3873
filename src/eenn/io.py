"""Small file helpers shared by every layer: strict JSON with infinities (thresholds that never
fire are ``inf``; JSON has no such number, so they are written as the strings "inf" / "-inf")."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["decode_inf", "encode_inf", "read_json", "write_json", "writable_text_file"]


def writable_text_file(path: str | Path, what: str) -> Path:
    """``path`` for a text file of ``what`` (a calibration, a plan), refused when it names a
    checkpoint (by its suffix or its bytes): an ``--out`` mistyped onto ``best.safetensors`` must
    not replace the weights."""
    p = Path(path)
    checkpoint = p.suffix == ".safetensors"
    if not checkpoint and p.is_file():
        with open(p, "rb") as f:
            head = f.read(9)
        checkpoint = len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 32
    if checkpoint:
        raise ValueError(f"{p} is a checkpoint (safetensors): writing {what} there would replace it; give another "
                         "path (e.g. a .json or .yaml file)")
    if p.is_dir():
        raise ValueError(f"{p} is a folder: give a file path for {what}")
    return p


def read_json(path: str | Path) -> Any:
    """A JSON file eenn wrote: infinities (stored as the strings "inf" / "-inf") come back as floats."""
    return decode_inf(json.loads(Path(path).read_text()))


def write_json(obj: Any, path: str | Path) -> Path:
    """Strict JSON (infinities as the strings "inf" / "-inf")."""
    p = Path(path)
    p.write_text(json.dumps(encode_inf(obj), indent=2))
    return p


def decode_inf(obj):
    if obj in ("inf", "-inf"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: decode_inf(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_inf(v) for v in obj]
    return obj


def encode_inf(obj):
    """JSON has no infinities: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: encode_inf(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_inf(v) for v in obj]
    return obj
