"""The binary hand-off between tiers: named NumPy arrays plus a small JSON header, no pickling.

Layout: ``b"EEN1"``, the header length (uint32, little-endian), the UTF-8 JSON header
``{"meta": {...}, "arrays": [{"name", "dtype", "wire", "shape"}, ...]}``, then each array's raw
bytes (C order, little-endian) one after another. ``wire`` is the dtype on the wire: with
``float16=True`` the float32 arrays named in ``half`` (the features) travel as float16 and are
widened again on arrival; everything else travels exactly.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any, Iterable

import numpy as np

__all__ = ["CodecError", "encode", "decode"]

MAGIC = b"EEN1"
_ALLOWED = {"float16", "float32", "float64", "int64", "int32", "uint8", "bool"}
# the little-endian wire dtype of each allowed name, made once (not per array of every message)
_WIRE = {name: np.dtype(name).newbyteorder("<") for name in _ALLOWED}


class CodecError(ValueError):
    """A hand-off message that cannot be read (truncated, foreign or malformed)."""


def encode(arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None, *, float16: bool = False,
           half: Iterable[str] | None = None) -> bytes:
    """``arrays`` and JSON-able ``meta`` as one message; ``half`` names the arrays that may
    travel as float16 when ``float16`` is set (all float32 arrays when ``half`` is None)."""
    half = set(half) if half is not None else None
    specs, blobs = [], []
    for name, a in arrays.items():
        a = np.asarray(a)
        dtype = a.dtype.name
        if dtype not in _ALLOWED:
            raise CodecError(f"array {name!r} has dtype {dtype}, which the hand-off does not carry")
        wire = "float16" if float16 and dtype == "float32" and (half is None or name in half) else dtype
        data = np.ascontiguousarray(a, dtype=_WIRE[wire])
        specs.append({"name": name, "dtype": dtype, "wire": wire, "shape": list(a.shape)})
        blobs.append(data.tobytes())
    header = json.dumps({"meta": meta or {}, "arrays": specs}, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *blobs])


def decode(message: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, meta)`` of a message made by :func:`encode`."""
    view = memoryview(message)
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise CodecError("not an eenn hand-off message (bad magic)")
    (n,) = struct.unpack("<I", view[4:8])
    if 8 + n > len(view):
        raise CodecError("truncated hand-off message (header)")
    try:
        header = json.loads(bytes(view[8:8 + n]))
        specs, meta = header["arrays"], header["meta"]
    except (ValueError, KeyError, TypeError) as e:
        raise CodecError(f"malformed hand-off header: {e}") from None
    pos, arrays = 8 + n, {}
    for s in specs:
        if s.get("wire") not in _ALLOWED or s.get("dtype") not in _ALLOWED:
            raise CodecError(f"hand-off array {s.get('name')!r}: unsupported dtype")
        wire = _WIRE[s["wire"]]
        try:
            shape = tuple(int(d) for d in s["shape"])
        except (TypeError, ValueError):
            raise CodecError(f"hand-off array {s.get('name')!r}: malformed shape {s.get('shape')!r}") from None
        if any(d < 0 for d in shape):
            raise CodecError(f"hand-off array {s.get('name')!r}: negative dimension in shape {shape}")
        size = math.prod(shape) * wire.itemsize
        if pos + size > len(view):
            raise CodecError(f"truncated hand-off message (array {s['name']!r})")
        a = np.frombuffer(view[pos:pos + size], dtype=wire).reshape(shape)
        arrays[s["name"]] = a.astype(s["dtype"])  # a native-order copy: writable, owns its memory
        pos += size
    if pos != len(view):
        raise CodecError("hand-off message has trailing bytes")
    return arrays, meta
