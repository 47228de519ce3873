"""Evaluation from cached per-exit outputs (STYLE.md habit 7): run the network once over a
split, keep every exit's logits and gates, then sweep rules and budgets over the cache."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import distributed as D
from .data import DataSplits, TensorDataset, TensorLoader
from .network import MultiExitNetwork
from .functional import exit_losses

__all__ = ["CachedOutputs", "collect_outputs", "evaluate_exits"]


class CachedOutputs(NamedTuple):
    logits: Tensor  # [E, N, C], final exit last
    gates: Tensor | None  # [E, N]
    targets: Tensor  # [N]


@torch.no_grad()
def collect_outputs(net: MultiExitNetwork, dataset: TensorDataset | tuple[Tensor, Tensor], *, batch_size: int = 512,
                    device=None) -> CachedOutputs:
    """Every exit's output on every sample of ``dataset`` (eval mode; kept on the CPU): a
    ``TensorDataset`` of pixels, normalised by ``net.input_spec`` (a ValueError when the network
    has none), or a pair ``(inputs, labels)`` of tensors given to the network as they are (token
    ids, say, or model inputs already normalised)."""
    if isinstance(dataset, DataSplits):
        raise TypeError("collect_outputs: dataset is one split (a TensorDataset), e.g. the validation one: pass "
                        "data.val (or data.test), not data")
    if not isinstance(dataset, (TensorDataset, tuple)):
        raise TypeError(f"collect_outputs: dataset must be a TensorDataset (e.g. data.val) or a pair (inputs, labels) "
                        f"of tensors, got {type(dataset).__name__}")
    dev = device or next(net.parameters()).device
    if isinstance(dataset, tuple):
        if len(dataset) != 2 or not all(isinstance(t, Tensor) for t in dataset) or len(dataset[0]) != len(dataset[1]):
            raise ValueError("collect_outputs takes a TensorDataset or a pair (inputs, labels) of tensors of one length")
        batches = ((dataset[0][i:i + batch_size].to(dev), dataset[1][i:i + batch_size].to(dev))
                   for i in range(0, len(dataset[1]), batch_size))
    else:
        batches = TensorLoader(dataset, batch_size, input_spec=net.require_input_spec("collect_outputs"), device=dev)
    logits, gates, ys = [], [], []
    was = net.training
    net.eval()
    try:
        for x, y in batches:
            out = net(x)
            logits.append(out.logits.float().cpu())
            if out.gates is not None:
                gates.append(out.gates.float().cpu())
            ys.append(y.cpu())
    finally:
        net.train(was)
    if not ys:
        raise ValueError("collect_outputs: no samples to run")
    return CachedOutputs(torch.cat(logits, 1), torch.cat(gates, 1) if gates else None, torch.cat(ys))


@torch.no_grad()
def evaluate_exits(net: MultiExitNetwork, dataset: TensorDataset, *, batch_size: int = 512,
                   device=None, env: D.DistEnv = D.DistEnv()) -> dict[str, list[float]]:
    """Per-exit mean cross-entropy and accuracy of ``net`` on ``dataset`` (eval mode), its pixels
    normalised by ``net.input_spec`` (a ValueError when the network has none).

    The split is cut into the same consecutive batches whatever the number of processes; under
    DDP rank r scores batches r, r + world_size, ... and the per-batch sums are gathered and added
    in batch order. So the figures equal, bit for bit, those of one process evaluating the same
    weights with the same ``batch_size`` (given bit-identical buffers on every rank, which the
    trainer ensures): the metric that picks ``best.safetensors`` is the checkpoint's own."""
    spec = net.require_input_spec("evaluate_exits")
    n_batches = -(-len(dataset) // batch_size)
    mine = list(range(env.rank, n_batches, env.world_size))  # global numbers of this rank's batches
    if env.enabled:  # only this rank's batches; all are full but the split's last, so boundaries stay
        keep = [torch.arange(i * batch_size, min((i + 1) * batch_size, len(dataset))) for i in mine]
        dataset = dataset.subset(torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long))
    loader = TensorLoader(dataset, batch_size, input_spec=spec, device=device)
    was = net.training
    net.eval()
    dev = loader.device
    # per batch: [loss sum, correct] per exit, and the batch's size
    per_batch = torch.zeros(n_batches, 2, net.num_exits, dtype=torch.float64, device=dev)
    sizes = torch.zeros(n_batches, dtype=torch.float64, device=dev)
    for i, (x, y) in zip(mine, loader):
        logits = net(x).logits.float()
        per_batch[i, 0] = exit_losses(logits, y).double() * y.numel()
        per_batch[i, 1] = (logits.argmax(-1) == y).sum(1).double()
        sizes[i] = y.numel()
    net.train(was)
    # each slot is written by one rank and zero elsewhere: the sum over ranks is exact
    D.all_reduce_sum(per_batch, env, "the validation reduction")
    D.all_reduce_sum(sizes, env, "the validation reduction")
    sums = torch.zeros(2, net.num_exits, dtype=torch.float64, device=dev)
    for i in range(n_batches):  # in batch order, as one process adds them
        sums += per_batch[i]
    n = max(sizes.sum().item(), 1.0)
    return {"loss": (sums[0] / n).tolist(), "acc": (sums[1] / n).tolist()}
