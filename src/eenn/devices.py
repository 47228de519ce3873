"""The device a user names, checked before anything is moved there."""
from __future__ import annotations

import torch

__all__ = ["usable_device"]


def usable_device(device: str | torch.device, what: str = "device") -> torch.device:
    """``device`` as a ``torch.device``, refused in one line where this machine has none such
    (CUDA asked for without CUDA), before anything is moved there; ``what``: the argument's name
    in the message. Shared by :func:`eenn.load`, the trainer and the evaluating commands."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{what} {device!r} is not a device ({e}): give 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {str(device)!r} asked for, but CUDA is not available here")
    return dev
