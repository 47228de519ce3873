"""Where a warning should point: the first frame outside eenn (the user's call), whichever of
eenn's code paths (and how deep a tracer's stack) led to it."""
from __future__ import annotations

import sys
from pathlib import Path

_INSIDE = str(Path(__file__).parent)


def caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, from the function calling this one, that names the first
    frame outside the eenn package (and outside torch.fx, which calls traced code)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(_INSIDE) or "/torch/fx/" in frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level
