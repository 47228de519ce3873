"""Evaluation from cached per-exit outputs (STYLE.md habit 7): run the network once over a
split, keep every exit's logits and gates, then sweep rules and budgets over the cache."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import distributed as D
from .data import TensorDataset, TensorLoader
from .network import MultiExitNetwork
from .objectives.joint import exit_losses

__all__ = ["CachedOutputs", "collect_outputs", "evaluate_exits"]


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


@torch.no_grad()
def evaluate_exits(net: MultiExitNetwork, dataset: TensorDataset, *, batch_size: int = 512,
                   mean=None, std=None, device=None, env: D.DistEnv = D.DistEnv()) -> dict[str, list[float]]:
    """Per-exit mean cross-entropy and accuracy of ``net`` on ``dataset`` (eval mode). Under
    DDP each rank takes every ``world_size``-th sample and the sums are reduced exactly."""
    if env.enabled:
        dataset = dataset.subset(torch.arange(env.rank, len(dataset), env.world_size))
    loader = TensorLoader(dataset, batch_size, mean=mean, std=std, device=device)
    was = net.training
    net.eval()
    dev = loader.device
    sums = torch.zeros(2, net.num_exits, dtype=torch.float64, device=dev)  # loss, correct
    count = torch.zeros(1, dtype=torch.float64, device=dev)
    for x, y in loader:
        logits = net(x).logits.float()
        sums[0] += exit_losses(logits, y).double() * y.numel()
        sums[1] += (logits.argmax(-1) == y).sum(1).double()
        count += y.numel()
    net.train(was)
    D.all_reduce_sum(sums, env)
    D.all_reduce_sum(count, env)
    n = max(count.item(), 1.0)
    return {"loss": (sums[0] / n).tolist(), "acc": (sums[1] / n).tolist()}
