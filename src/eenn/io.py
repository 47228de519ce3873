"""Small file helpers shared by every layer: strict JSON with infinities (thresholds that never
fire are ``inf``; JSON has no such number, so they are written as the strings "inf" / "-inf")."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["read_json", "write_json"]


def read_json(path: str | Path) -> Any:
    """A JSON file eenn wrote: infinities (stored as the strings "inf" / "-inf") come back as floats."""
    return _infinite(json.loads(Path(path).read_text()))


def write_json(obj: Any, path: str | Path) -> Path:
    """Strict JSON (infinities as the strings "inf" / "-inf")."""
    p = Path(path)
    p.write_text(json.dumps(_finite(obj), indent=2))
    return p


def _infinite(obj):
    if obj in ("inf", "-inf"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _infinite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_infinite(v) for v in obj]
    return obj


def _finite(obj):
    """JSON has no infinities: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
