"""Adapters between feature shapes: what lets a module written for one stage's features (a
backbone's classifier) read another stage's."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["shape_adapter"]


def shape_adapter(shape: tuple[int, ...], target: tuple[int, ...], body: nn.Module) -> nn.Module:
    """What brings features of ``shape`` to ``target``, the shape ``body`` reads: a 1x1
    convolution to its channels and an average pool to its map size (none where ``body`` takes
    the map as it is, as a classifier that pools itself does), a linear map of widths for token
    states (the same count) and flat features. Used by the ``replica`` exit head."""
    if shape == target:
        return nn.Identity()
    if len(shape) != len(target) or (len(shape) == 2 and shape[0] != target[0]):
        raise ValueError(f"exit head 'replica': this stage gives features of shape {list(shape)} and the classifier "
                         f"reads {list(target)}; there is no adapter between those, pick another head")
    if len(shape) != 3:  # token states (same count) or flat features: the widths
        return nn.Linear(shape[-1], target[-1])
    (c, h, w), (c2, h2, w2) = shape, target
    mods: list[nn.Module] = [nn.Conv2d(c, c2, 1)] if c != c2 else []
    if (h, w) != (h2, w2) and not _reads(body, (c2, h, w)):
        if h < h2 or w < w2:
            raise ValueError(f"exit head 'replica': this stage's {h}x{w} map is smaller than the {h2}x{w2} the "
                             "classifier reads; pick another head")
        # windows of stride s = h // h2 and size h - (h2 - 1) s: exactly h2 of them (s where s
        # divides h); an average pool of fixed windows, which ONNX has, where an adaptive pool to a
        # size that does not divide the map has no ONNX form
        s = (h // h2, w // w2)
        mods.append(nn.AvgPool2d((h - (h2 - 1) * s[0], w - (w2 - 1) * s[1]), stride=s))
    return nn.Sequential(*mods)


def _reads(body: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether ``body`` takes features of ``shape`` as they are (a classifier that pools itself)."""
    try:
        with torch.no_grad():
            body.eval()(torch.zeros(2, *shape))
        return True
    except (RuntimeError, ValueError):
        return False
    finally:
        body.train()
