"""``TensorLoader``: batches of a ``TensorDataset`` by index-slicing its uint8 tensor, with no
per-sample Python work, no worker processes, and every random choice a function of (seed, epoch).

Per epoch the loader draws, on the CPU, one permutation of the data set and (with ``augment``) one
crop offset and one flip bit per position of that permutation; with ``world_size > 1`` the padded
permutation is dealt round-robin to the ranks, exactly like ``DistributedSampler``. Because the
augmentation is drawn per global position, what a sample gets does not depend on the rank count.
Each batch is then gathered on ``device`` (crop and flip fused in one indexing op on uint8) and
converted to float32 as ``(x / 255 - mean) / std`` by :func:`eenn.data.spec.normalize`'s arithmetic
(given as ``mean``/``std`` or as an ``input_spec``). Token ids and float features are model inputs
already: their batches are only gathered on ``device``, integers staying integers.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .core import TensorDataset
from .spec import InputSpec, PerChannel, apply_normalization, describe_input, normalization_factors

_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1


def _stream_seed(seed: int, epoch: int, stream: int) -> int:
    """A well-mixed 63-bit seed for one (seed, epoch, stream), so nearby seeds give unrelated streams."""
    words = np.random.SeedSequence([seed % 2**64, epoch % 2**64, stream]).generate_state(2, np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & (2**63 - 1)


def crop_flip(x: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int) -> Tensor:
    """Per-sample crop of the zero-padded batch at (top, left), mirrored where ``flip``: one gather."""
    b, c, h, w = x.shape
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
    dev = x.device
    rows = top[:, None] + torch.arange(h, device=dev)                         # [B, H]
    cols = torch.arange(w, device=dev).expand(b, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + left[:, None]     # [B, W]
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return x[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class TensorLoader:
    """Iterate ``(x float32 [B, C, H, W], y int64 [B])`` on ``device`` (plus the samples' indices
    with ``return_indices``); see the module docstring. The normalisation is ``mean``/``std`` or
    ``input_spec`` (an :class:`~eenn.data.InputSpec`, e.g. ``net.input_spec``), not both; with
    neither, pixels are only scaled to [0, 1]. A data set of token ids or float features gives its
    samples as they are (``[B, ...]``, its own dtype); ``input_spec`` must then be of that kind,
    and ``augment`` (crops and flips of images) is refused."""

    def __init__(self, dataset: TensorDataset, batch_size: int, *, shuffle: bool = False, drop_last: bool = False,
                 mean: PerChannel = None, std: PerChannel = None, input_spec: InputSpec | None = None,
                 augment: bool = False, crop_padding: int = 4, flip: bool = True,
                 device: str | torch.device | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 return_indices: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if device is not None and dataset.device != torch.device(device):
            dataset = dataset.to(device)  # once, here; batches are then sliced on the device
        self.dataset = dataset
        self.device = dataset.device
        self.batch_size, self.shuffle, self.drop_last = int(batch_size), shuffle, drop_last
        self.augment, self.crop_padding, self.flip = augment, int(crop_padding), flip
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self.return_indices = return_indices  # yield (x, y, indices into `dataset`)
        kind, shape = dataset.kind, tuple(dataset.x.shape[1:])
        if input_spec is not None:
            if mean is not None or std is not None:
                raise ValueError("give the normalisation as mean/std or as input_spec, not both")
            if input_spec.kind != kind:
                raise ValueError(f"the data set holds {describe_input(kind, shape)}, the input_spec says the network "
                                 f"takes {input_spec.describe()}")
            if shape != input_spec.shape:
                what = "images" if kind == "pixels" else "samples"
                raise ValueError(f"the {what} are {shape}, the input_spec says {input_spec.shape}")
        if kind != "pixels":
            if mean is not None or std is not None:
                raise ValueError(f"mean/std normalise uint8 pixels; this data set holds {describe_input(kind, shape)}, "
                                 "which go to the network as they are: leave mean/std out")
            if augment:
                raise ValueError(f"augment=True crops and flips images; this data set holds "
                                 f"{describe_input(kind, shape)}: set augment=False")
            self._scale = self._shift = None  # model inputs as they are
        elif input_spec is not None:
            self._scale, self._shift = input_spec.factors(self.device)
        else:  # (x / 255 - mean) / std == x * scale + shift
            self._scale, self._shift = normalization_factors(mean, std, dataset.x.shape[1], self.device)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle order and augmentation the next iteration replays."""
        self.epoch = int(epoch)

    def _generator(self, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(_stream_seed(self.seed, self.epoch, stream))

    def num_samples(self) -> int:
        """Samples this rank sees per epoch (before ``drop_last``)."""
        return math.ceil(len(self.dataset) / self.world_size)

    def __len__(self) -> int:
        n = self.num_samples()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _global_order(self) -> Tensor:
        """This epoch's permutation, padded by wrapping to a multiple of world_size."""
        n = len(self.dataset)
        order = torch.randperm(n, generator=self._generator(_SHUFFLE_STREAM)) if self.shuffle else torch.arange(n)
        total = self.num_samples() * self.world_size
        if n and total > n:
            order = order.repeat(math.ceil(total / n))[:total]
        return order

    def _shard(self, t: Tensor) -> Tensor:
        return t[self.rank::self.world_size] if self.world_size > 1 else t

    def _augment_params(self, total: int) -> tuple[Tensor, Tensor, Tensor]:
        g = self._generator(_AUGMENT_STREAM)
        top = torch.randint(0, 2 * self.crop_padding + 1, (total,), generator=g)
        left = torch.randint(0, 2 * self.crop_padding + 1, (total,), generator=g)
        flip = torch.rand(total, generator=g) < 0.5
        if not self.flip:
            flip = torch.zeros_like(flip)
        return top, left, flip

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self._global_order()
        params = [self._shard(p).to(self.device) for p in self._augment_params(len(order))] if self.augment else None
        order = self._shard(order).to(self.device)
        x_all, y_all, bs = self.dataset.x, self.dataset.y, self.batch_size
        for i in range(len(self)):
            sl = slice(i * bs, (i + 1) * bs)
            idx = order[sl]
            x = x_all[idx]
            if params is not None:
                x = crop_flip(x, params[0][sl], params[1][sl], params[2][sl], self.crop_padding)
            if self._scale is not None:
                x = apply_normalization(x, self._scale, self._shift)
            yield (x, y_all[idx], idx) if self.return_indices else (x, y_all[idx])
