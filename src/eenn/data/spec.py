"""What a network takes as input, and the one place raw pixels become model inputs.

:class:`InputSpec` describes the input of a network: its ``kind`` — ``"pixels"`` (uint8 images
``(C, H, W)``, normalised with the per-channel ``mean``/``std`` of the training pixels scaled to
[0, 1]), ``"tokens"`` (integer token ids, e.g. ``(L,)``) or ``"features"`` (float model inputs of
any per-sample shape) — its per-sample ``shape``, and the class names. Token ids and features are
model inputs as they are: nothing normalises them. A :class:`~eenn.MultiExitNetwork` carries one
(``net.input_spec``, set by :func:`eenn.fit`, saved in checkpoints and written to exports), so
that evaluation, serving and export all turn data into inputs the way training did.

:func:`normalize` is THE normalisation: ``(x / 255 - mean) / std`` computed as
``x * scale + shift`` with ``scale = 1 / (255 std)`` and ``shift = -mean / std`` rounded to float32
from float64. :class:`~eenn.data.TensorLoader`, the trainer's epoch context, ``net.preprocess`` and
the server all use it, so the same pixels give bit-identical inputs everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["INPUT_KINDS", "InputSpec", "PerChannel", "apply_normalization", "describe_input", "input_kind",
           "normalization_factors", "normalize", "per_channel"]

#: What a network's inputs can be: uint8 images to normalise, integer token ids, float model inputs.
INPUT_KINDS = ("pixels", "tokens", "features")
_KIND_WORDS = {"pixels": "uint8 pixels", "tokens": "token ids", "features": "float features"}

PerChannel = float | Sequence[float] | Tensor | None


def per_channel(value: PerChannel, channels: int, default: float) -> Tensor:
    """``value`` as float64 ``[channels]`` on the CPU (one value is repeated; None gives ``default``)."""
    t = torch.full((channels,), default, dtype=torch.float64) if value is None else \
        torch.as_tensor(value, dtype=torch.float64).flatten().cpu()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"expected 1 or {channels} per-channel values, got {t.numel()}")
    return t


def normalization_factors(mean: PerChannel, std: PerChannel, channels: int,
                          device: str | torch.device | None = None) -> tuple[Tensor, Tensor]:
    """``(scale, shift)``, float32 ``[C, 1, 1]`` on ``device``, such that
    ``(x / 255 - mean) / std == x * scale + shift`` (mean 0 and std 1 where None)."""
    mean_t, std_t = per_channel(mean, channels, 0.0), per_channel(std, channels, 1.0)
    if bool((std_t <= 0).any()):
        raise ValueError(f"std must be positive, got {std_t.tolist()}")
    scale = (1.0 / (255.0 * std_t)).to(device, torch.float32).view(-1, 1, 1)
    shift = (-mean_t / std_t).to(device, torch.float32).view(-1, 1, 1)
    return scale, shift


def apply_normalization(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """uint8 pixels ``[..., C, H, W]`` -> float32 ``x * scale + shift`` (a multiply, then an add)."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalisation takes uint8 pixels (0..255), got {x.dtype}")
    return x.to(torch.float32).mul_(scale).add_(shift)


def normalize(x: Tensor, mean: PerChannel, std: PerChannel) -> Tensor:
    """uint8 pixels ``[..., C, H, W]`` -> float32 ``(x / 255 - mean) / std`` on ``x``'s device."""
    if x.ndim < 3:
        raise ValueError(f"pixels must be [..., C, H, W], got shape {tuple(x.shape)}")
    return apply_normalization(x, *normalization_factors(mean, std, x.shape[-3], x.device))


def input_kind(x: Tensor) -> str:
    """The kind of model input a tensor of samples holds, by its dtype: uint8 -> ``"pixels"``,
    int64/int32 -> ``"tokens"``, floating point -> ``"features"`` (a TypeError for anything else)."""
    if x.dtype == torch.uint8:
        return "pixels"
    if x.dtype in (torch.int64, torch.int32):
        return "tokens"
    if x.is_floating_point():
        return "features"
    raise TypeError(f"inputs must be uint8 pixels [N, C, H, W], int64/int32 token ids or floating-point features, "
                    f"got {str(x.dtype).removeprefix('torch.')}")


def describe_input(kind: str, shape: Sequence[int]) -> str:
    """``kind`` and per-sample ``shape`` in words, e.g. ``token ids [B, 16]``."""
    return f"{_KIND_WORDS.get(kind, kind)} [B, {', '.join(map(str, shape))}]"


@dataclass(frozen=True)
class InputSpec:
    """The input a network takes: per-sample ``shape``, for ``kind="pixels"`` (the default)
    ``(C, H, W)`` with the per-channel ``mean``/``std`` of the training pixels scaled to [0, 1];
    for ``"tokens"`` (integer ids) and ``"features"`` (floats) any shape and no ``mean``/``std``,
    as they are model inputs already; and (optionally) the ``class_names``."""

    shape: tuple[int, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    kind: str = "pixels"
    _factors: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # per device

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"InputSpec.kind must be one of {', '.join(INPUT_KINDS)}, got {self.kind!r}")
        shape = tuple(int(s) for s in self.shape)
        if self.kind != "pixels":
            if not shape or min(shape) < 1:
                raise ValueError(f"InputSpec.shape must be a per-sample shape with positive sizes, got {self.shape}")
            for name in ("mean", "std"):
                value = getattr(self, name)
                if value is not None and torch.as_tensor(value).numel():
                    raise ValueError(f"InputSpec.{name}: {_KIND_WORDS[self.kind]} are model inputs as they are, not "
                                     f"normalised; leave {name} out")
            mean = std = ()
        else:
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"InputSpec.shape must be (C, H, W) with positive sizes, got {self.shape}")
            mean = tuple(float(m) for m in per_channel(self.mean, shape[0], 0.0).tolist())
            std = tuple(float(s) for s in per_channel(self.std, shape[0], 1.0).tolist())
            if min(std) <= 0:
                raise ValueError(f"InputSpec.std must be positive, got {std}")
        names = tuple(str(n) for n in self.class_names) if self.class_names is not None else None
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "class_names", names)

    @classmethod
    def from_info(cls, info) -> "InputSpec":
        """The input description of a data set (a :class:`~eenn.data.DatasetInfo`)."""
        kind = getattr(info, "kind", "pixels")
        if kind != "pixels":
            return cls(tuple(info.input_shape), class_names=info.class_names, kind=kind)
        return cls((info.in_channels, *info.input_size), info.mean, info.std, info.class_names)

    def to_dict(self) -> dict[str, Any]:
        names = list(self.class_names) if self.class_names is not None else None
        if self.kind != "pixels":
            return {"kind": self.kind, "shape": list(self.shape), "class_names": names}
        return {"shape": list(self.shape), "mean": list(self.mean), "std": list(self.std), "class_names": names}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputSpec":
        kind = d.get("kind", "pixels")
        if kind != "pixels":
            return cls(tuple(d["shape"]), class_names=d.get("class_names"), kind=kind)
        return cls(tuple(d["shape"]), tuple(d["mean"]), tuple(d["std"]), d.get("class_names"))

    def same_input(self, other: "InputSpec") -> bool:
        """Whether ``other`` has the same kind, shape and normalisation (class names aside)."""
        return (self.kind, self.shape, self.mean, self.std) == (other.kind, other.shape, other.mean, other.std)

    def describe(self) -> str:
        """What this input is, in words: ``uint8 pixels [B, 1, 8, 8]``, ``token ids [B, 16]``."""
        return describe_input(self.kind, self.shape)

    def factors(self, device: str | torch.device | None = None) -> tuple[Tensor, Tensor]:
        """:func:`normalization_factors` of this spec on ``device`` (made once per device)."""
        if self.kind != "pixels":
            raise ValueError(f"{_KIND_WORDS[self.kind]} are model inputs as they are: there is no normalisation")
        key = str(torch.device(device) if device is not None else torch.device("cpu"))
        if key not in self._factors:
            self._factors[key] = normalization_factors(self.mean, self.std, self.shape[0], device)
        return self._factors[key]

    def normalize(self, x: Tensor) -> Tensor:
        """Samples ``[..., *shape]`` -> the model input on ``x``'s device: uint8 pixels become float32
        ``(x / 255 - mean) / std``; token ids and features are returned as they are, once their
        shape and dtype are checked."""
        if self.kind != "pixels":
            n = len(self.shape)
            fits = x.is_floating_point() if self.kind == "features" else \
                not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)
            if x.ndim < n or tuple(x.shape[x.ndim - n:]) != self.shape or not fits:
                raise ValueError(f"inputs {str(x.dtype).removeprefix('torch.')} {list(x.shape)} do not fit this "
                                 f"network, which takes {self.describe()}")
            return x
        if tuple(x.shape[-3:]) != self.shape:
            raise ValueError(f"pixels of shape {tuple(x.shape)} do not fit this input, [..., "
                             f"{', '.join(map(str, self.shape))}]")
        return apply_normalization(x, *self.factors(x.device))
