"""The in-memory containers of the data layer and the helpers that split them.

A data set is held as ONE tensor of samples and one int64 tensor of labels ``[N]``: compact,
movable to a GPU in one copy, and batched by slicing. The registered data sets hold uint8 images
``[N, C, H, W]`` (0..255, a byte per pixel); data of one's own (:func:`eenn.data.from_tensors`)
may also be integer token ids ``[N, L]`` or float features ``[N, ...]``, model inputs as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .spec import input_kind


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int | None   # None where the samples are not images
    input_size: tuple[int, int] | None
    mean: tuple[float, ...]   # per channel, of x/255 on the train split (after the val carve-out)
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    # how load_dataset split it ({"seed", "val_fraction", "limit"}), so that a trained network's
    # checkpoint can name its validation split; None for splits made otherwise
    split: dict[str, Any] | None = field(default=None, compare=False)
    # what the samples are: "pixels" (uint8, normalised by mean/std), "tokens" (integer ids) or
    # "features" (floats); the last two have no in_channels/input_size and empty mean/std
    kind: str = "pixels"
    input_shape: tuple[int, ...] | None = None  # per sample; (in_channels, *input_size) for pixels

    def __post_init__(self) -> None:
        if self.kind == "pixels" and self.input_shape is None:
            object.__setattr__(self, "input_shape", (int(self.in_channels), *map(int, self.input_size)))


def _as_tensor(a: Any) -> Tensor:
    if isinstance(a, np.ndarray):  # frombuffer arrays are read-only: copy those, share the rest
        return torch.from_numpy(np.require(a, requirements=["C", "W"]))
    return torch.as_tensor(a)


class TensorDataset:
    """Samples ``x`` and labels ``y`` int64 ``[N]`` on one device. ``x`` is uint8 images
    ``[N, C, H, W]``, int64/int32 token ids ``[N, L]`` or floating-point features ``[N, ...]``
    (its ``kind``: ``"pixels"``, ``"tokens"`` or ``"features"``)."""

    def __init__(self, x: Tensor | np.ndarray, y: Tensor | np.ndarray | Sequence[int]) -> None:
        self.x = _as_tensor(x)
        y = _as_tensor(y)
        self.kind = input_kind(self.x)  # a TypeError for other dtypes
        if y.is_floating_point() or y.is_complex():
            raise TypeError(f"labels must be integer class indices, got {str(y.dtype).removeprefix('torch.')}; "
                            "whole numbers stored as floats: pass y.long()")
        self.y = y.to(self.x.device, torch.int64)
        if self.kind == "pixels" and self.x.ndim != 4:
            raise ValueError(f"uint8 samples are images [N, C, H, W], got shape {tuple(self.x.shape)}; token ids "
                             "must be int64 or int32 (x.long())")
        if self.x.ndim < 2:
            raise ValueError(f"samples must be [N, ...] with one row per sample, got shape {tuple(self.x.shape)}; "
                             "one number per sample is x[:, None]")
        if self.y.shape != (len(self.x),):
            raise ValueError(f"labels must be [N] with N={len(self.x)}, got shape {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device: str | torch.device) -> "TensorDataset":
        return TensorDataset(self.x.to(device), self.y.to(device))

    def subset(self, indices: Tensor | np.ndarray | Sequence[int]) -> "TensorDataset":
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor) else indices,
                              dtype=torch.int64, device=self.device)
        return TensorDataset(self.x[idx], self.y[idx])

    def __repr__(self) -> str:
        return f"TensorDataset(n={len(self)}, shape={tuple(self.x.shape[1:])}, device={self.device})"


@dataclass
class DataSplits:
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    info: DatasetInfo


# ---------------------------------------------------------------------------------------- splitting

def stratified_pick(labels: np.ndarray, count: int, seed: Sequence[int]) -> np.ndarray:
    """Sorted indices of ``count`` samples drawn at random (seeded) with the class proportions of
    ``labels`` preserved: each class gives ``count * n_c / n`` rounded so the total is exact."""
    labels = np.asarray(labels)
    n = len(labels)
    count = min(max(int(count), 0), n)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = counts * (count / n)
    take = np.floor(quota).astype(np.int64)
    short = count - int(take.sum())  # hand the rest to the largest remainders, ties in a seeded order
    if short:
        order = np.random.default_rng([*seed, 1]).permutation(len(classes))
        take[order[np.argsort(-(quota - take)[order], kind="stable")][:short]] += 1
    perm = np.random.default_rng(list(seed)).permutation(n)
    grouped = perm[np.argsort(inverse[perm], kind="stable")]  # by class, shuffled within each class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    picked = np.concatenate([grouped[s:s + t] for s, t in zip(starts, take)])
    return np.sort(picked)


def complement(n: int, picked: np.ndarray) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    mask[picked] = False
    return np.flatnonzero(mask)


def split_off(ds: TensorDataset, fraction: float, seed: Sequence[int]) -> tuple[TensorDataset, TensorDataset]:
    """(rest, part): ``part`` holds round(fraction * N) samples, stratified by label."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the fraction to split off must be in [0, 1), got {fraction}")
    labels = ds.y.cpu().numpy()
    picked = stratified_pick(labels, round(fraction * len(ds)), seed)
    return ds.subset(complement(len(ds), picked)), ds.subset(picked)


def cap(ds: TensorDataset, limit: int | None, seed: Sequence[int]) -> TensorDataset:
    """At most ``limit`` samples, stratified and seeded; unchanged when already small enough."""
    if limit is None or len(ds) <= limit:
        return ds
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return ds.subset(stratified_pick(ds.y.cpu().numpy(), limit, seed))


def channel_stats(x: Tensor, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``x / 255`` (float64 sums over chunks: exact and low-memory).
    A constant channel gets std 1.0 rather than 0, so normalising by it stays finite."""
    c = x.shape[1]
    if len(x) == 0:
        return (0.0,) * c, (1.0,) * c
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].to("cpu", torch.float64).div_(255.0)
        total += part.sum(dim=(0, 2, 3))
        squares += part.square_().sum(dim=(0, 2, 3))
    count = x.numel() // c
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
