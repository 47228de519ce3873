"""Evaluation from cached per-exit outputs (STYLE.md habit 7): run the network once over a
split, keep every exit's logits and gates, then sweep rules and budgets over the cache."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .data import TensorDataset, TensorLoader
from .network import MultiExitNetwork

__all__ = ["CachedOutputs", "collect_outputs"]


class CachedOutputs(NamedTuple):
    logits: Tensor  # [E, N, C], final exit last
    gates: Tensor | None  # [E, N]
    targets: Tensor  # [N]


@torch.no_grad()
def collect_outputs(net: MultiExitNetwork, dataset: TensorDataset, *, mean=None, std=None,
                    batch_size: int = 512, device=None) -> CachedOutputs:
    """Every exit's output on every sample of ``dataset`` (eval mode; kept on the CPU)."""
    was = net.training
    net.eval()
    dev = device or next(net.parameters()).device
    logits, gates, ys = [], [], []
    for x, y in TensorLoader(dataset, batch_size, mean=mean, std=std, device=dev):
        out = net(x)
        logits.append(out.logits.float().cpu())
        if out.gates is not None:
            gates.append(out.gates.float().cpu())
        ys.append(y.cpu())
    net.train(was)
    return CachedOutputs(torch.cat(logits, 1), torch.cat(gates, 1) if gates else None, torch.cat(ys))
