"""The Prometheus text exposition format (version 0.0.4), for ``GET /metrics``."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

__all__ = ["prometheus_text"]

BACKSLASH, NEWLINE = "\\", "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float | int) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def prometheus_text(families: Sequence[tuple[str, str, str, Sequence[tuple[Mapping[str, str], float]]]]) -> str:
    """The Prometheus text exposition format (version 0.0.4) of ``(name, type, help, samples)``
    families, each sample ``(labels, value)``: ``# HELP`` and ``# TYPE`` lines, then one line per
    sample, ``name{label="value",...} number``."""
    lines = []
    for name, kind, help_, samples in families:
        lines.append(f"# HELP {name} {help_.replace(BACKSLASH, BACKSLASH * 2).replace(NEWLINE, BACKSLASH + 'n')}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {_number(value)}" if lab else f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"
