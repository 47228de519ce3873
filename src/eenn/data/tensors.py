"""Data of one's own: :func:`from_tensors` makes the train/val/test bundle that :func:`eenn.fit`
and the evaluation take out of tensors (or NumPy arrays) already in memory.

    data = from_tensors(train=(ids, labels), val=(val_ids, val_labels), test=None)

What ``x`` holds is read from its dtype: uint8 ``[N, C, H, W]`` is pixels, normalised by the train
split's per-channel statistics exactly as the registered data sets are; int64/int32 ``[N, L]`` is
token ids and floating point ``[N, ...]`` is features, both model inputs as they are (floats are
kept as float32, the dtype the network computes in). Everything is checked here, once, so that a
mistake is said in one line before any training starts.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .core import DataSplits, DatasetInfo, TensorDataset, channel_stats
from .spec import describe_input

__all__ = ["from_tensors", "split_info"]


def _tensor(a: Any, what: str) -> Tensor:
    if isinstance(a, Tensor):
        return a.detach()  # the same memory; data need no gradient
    if isinstance(a, np.ndarray):
        if a.dtype.kind not in "biuf":
            raise TypeError(f"from_tensors: {what} is a NumPy array of dtype {a.dtype}; give numbers")
        return torch.from_numpy(np.require(a, requirements=["C", "W"]))
    raise TypeError(f"from_tensors: {what} must be a torch.Tensor or a NumPy array, got {type(a).__name__}")


def _pair(split: str, pair: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"from_tensors: {split} must be a pair (x, y) of samples and labels, got "
                        f"{type(pair).__name__}{f' of {len(pair)}' if isinstance(pair, (tuple, list)) else ''}")
    x, y = _tensor(pair[0], f"{split} x"), _tensor(pair[1], f"{split} y")
    if x.ndim < 2:
        raise ValueError(f"from_tensors: {split} x has shape {list(x.shape)}; samples must be [N, ...] with one row "
                         "per sample (one number per sample: x[:, None])")
    if y.ndim != 1:
        raise ValueError(f"from_tensors: {split} y has shape {list(y.shape)}; labels must be [N], one class index "
                         "per sample")
    if len(x) != len(y):
        raise ValueError(f"from_tensors: {split} has {len(x)} samples but {len(y)} labels; x and y must be of one "
                         "length")
    if len(x) == 0:
        raise ValueError(f"from_tensors: the {split} split is empty; give it at least one sample"
                         + (" (or test=None for no test split)" if split == "test" else ""))
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"from_tensors: {split} y is {str(y.dtype).removeprefix('torch.')}; labels must be integer "
                        "class indices 0..num_classes-1 (y.long() if they are whole numbers)")
    return x, y.to(x.device, torch.int64)


def check_kind(split: str, x: Tensor, who: str = "from_tensors") -> str:
    dtype = str(x.dtype).removeprefix("torch.")
    if x.dtype == torch.uint8:
        if x.ndim != 4:
            raise ValueError(f"{who}: {split} x is uint8 of shape {list(x.shape)}; uint8 samples are pixels "
                             "[N, C, H, W] (token ids must be int64 or int32: x.long())")
        return "pixels"
    if x.dtype in (torch.int64, torch.int32):
        if len(x) and int(x.min()) < 0:
            raise ValueError(f"{who}: {split} x holds negative token ids (down to {int(x.min())}); ids index "
                             "an embedding and must be >= 0")
        return "tokens"
    if x.is_floating_point():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"{who}: {split} x holds {bad} NaN or infinite value(s); fix or drop those "
                             "samples first")
        return "features"
    raise TypeError(f"{who}: {split} x is {dtype}; samples must be uint8 pixels [N, C, H, W], int64/int32 "
                    "token ids or floating-point features")


def from_tensors(train: tuple[Any, Any], val: tuple[Any, Any], test: tuple[Any, Any] | None = None, *,
                 num_classes: int | None = None, class_names: Sequence[str] | None = None,
                 name: str = "tensors") -> DataSplits:
    """A :class:`~eenn.data.DataSplits` from your own ``(x, y)`` pairs of tensors or NumPy arrays.

    ``x`` is uint8 pixels ``[N, C, H, W]`` (normalised by the train split's per-channel mean/std,
    as the registered data sets are), int64/int32 token ids ``[N, L]`` or floating-point features
    ``[N, ...]`` (both given to the network as they are; floats stored as float32); every split
    the same kind and per-sample shape. ``y`` is integer class indices ``[N]``. ``test=None``
    gives an empty test split. ``num_classes`` defaults to ``len(class_names)``, else to the
    largest label + 1; ``class_names`` default to ``"0"``, ``"1"``, ... The tensors are shared,
    not copied (but for floats converted to float32 and labels converted to int64)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"from_tensors: name must be a non-empty string, got {name!r}")
    pairs = {"train": _pair("train", train), "val": _pair("val", val)}
    if test is not None:
        pairs["test"] = _pair("test", test)
    kinds = {split: check_kind(split, x) for split, (x, _) in pairs.items()}
    kind, shape = kinds["train"], tuple(pairs["train"][0].shape[1:])
    for split, (x, _) in pairs.items():
        if kinds[split] != kind or tuple(x.shape[1:]) != shape:
            raise ValueError(f"from_tensors: the {split} split holds {describe_input(kinds[split], x.shape[1:])}, the "
                             f"train split {describe_input(kind, shape)}; every split must hold the same kind "
                             "of samples of one shape")
    if kind == "features":
        pairs = {split: (x.float(), y) for split, (x, y) in pairs.items()}
    top = max(int(y.max()) for _, y in pairs.values())
    low = min(int(y.min()) for _, y in pairs.values())
    if class_names is not None:
        if isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names):
            raise TypeError("from_tensors: class_names must be a sequence of strings, one per class")
        class_names = tuple(class_names)
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(f"from_tensors: {len(class_names)} class_names for num_classes={num_classes}; give one "
                             "name per class")
        num_classes = len(class_names)
    if num_classes is None:
        num_classes = top + 1
        if num_classes < 2:
            raise ValueError(f"from_tensors: every label is {top}; a classifier needs at least 2 classes (give "
                             "num_classes= if some classes have no samples here)")
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"from_tensors: num_classes must be an int >= 2, got {num_classes!r}")
    if low < 0 or top >= num_classes:
        raise ValueError(f"from_tensors: labels range over [{low}, {top}]; they must be class indices in "
                         f"[0, {num_classes - 1}] (num_classes={num_classes})")
    names = class_names if class_names is not None else tuple(str(i) for i in range(num_classes))
    splits = {split: TensorDataset(x, y) for split, (x, y) in pairs.items()}
    if "test" not in splits:
        x, y = pairs["train"]
        splits["test"] = TensorDataset(x[:0], y[:0])
    info = split_info(name, kind, splits["train"].x, names)
    return DataSplits(train=splits["train"], val=splits["val"], test=splits["test"], info=info)


def split_info(name: str, kind: str, train_x: Tensor, class_names: tuple[str, ...],
               split: dict[str, Any] | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of samples of ``kind`` (see :func:`check_kind`): pixels get the train
    split's per-channel mean/std; token ids and features are given to the network as they are."""
    shape = tuple(train_x.shape[1:])
    if kind == "pixels":
        mean, std = channel_stats(train_x)
        return DatasetInfo(name=name, num_classes=len(class_names), in_channels=shape[0], input_size=shape[1:],
                           mean=mean, std=std, class_names=class_names, split=split)
    return DatasetInfo(name=name, num_classes=len(class_names), in_channels=None, input_size=None, mean=(), std=(),
                       class_names=class_names, kind=kind, input_shape=shape, split=split)
