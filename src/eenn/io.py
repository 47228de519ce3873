"""Small file helpers shared by every layer: strict JSON with infinities (thresholds that never
fire are ``inf``; JSON has no such number, so they are written as the strings "inf" / "-inf")."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["decode_inf", "encode_inf", "read_json", "write_json", "writable_text_file", "yaml_load", "dump_yaml"]

_LOADER = None


def _loader():
    """A safe YAML loader that also reads ``1e6`` and ``2.5e-3`` as floats (YAML 1.1, and so
    plain PyYAML, wants ``1.0e+6``)."""
    global _LOADER
    if _LOADER is None:
        import re

        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_implicit_resolver(
            "tag:yaml.org,2002:float",
            re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
            list("-+0123456789"))
        _LOADER = Loader
    return _LOADER


def yaml_load(text: str) -> Any:
    """YAML text (safe: plain data only), numbers like ``1e6`` included."""
    import yaml

    return yaml.load(text, Loader=_loader())


def yaml_error() -> type:
    """The error :func:`yaml_load` raises on text that is not YAML."""
    import yaml

    return yaml.YAMLError


def dump_yaml(data: Any) -> str:
    """``data`` as block YAML in its own key order, every value written out where it appears: no
    ``&id001`` anchors and ``*id001`` aliases for a list that two keys share (a file a person reads
    and edits)."""
    import yaml

    class _Plain(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return yaml.dump(data, Dumper=_Plain, sort_keys=False)


def _is_safetensors(p: Path) -> bool:
    """Whether safetensors reads ``p``'s header (the weights are not read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt"):
            return True
    except Exception:  # noqa: BLE001 - any file it cannot read is not one
        return False


def writable_text_file(path: str | Path, what: str) -> Path:
    """``path`` for a text file of ``what`` (a calibration, a plan), refused when it names a
    checkpoint (by its suffix or its bytes): an ``--out`` mistyped onto ``best.safetensors`` must
    not replace the weights."""
    p = Path(path)
    if p.suffix == ".safetensors" or (p.is_file() and _is_safetensors(p)):
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
