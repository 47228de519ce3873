"""The oracle: every sample leaves at its first correct exit (the final exit when none is
correct). No policy that only chooses *where* to exit can beat its accuracy-cost point, so the
share of its saving that a policy captures says how much of the exits' potential it uses."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..cost import CostTable
from ..outputs import CachedOutputs

__all__ = ["oracle_exit", "oracle", "captured_share"]


def check_cost_table(cost_table: CostTable, where: str) -> None:
    if not isinstance(cost_table, CostTable):
        raise TypeError(f"{where} takes the network's cost table, a CostTable (net.cost()), as cost_table; "
                        f"got a {type(cost_table).__name__}")


def oracle_exit(predictions: Tensor, targets: Tensor) -> Tensor:
    """``[N]`` index of the first exit whose prediction (``[E, N]``) is right; ``E-1`` if none."""
    correct = predictions == targets[None]
    correct[-1] = True
    return correct.to(torch.int8).argmax(0)


def oracle(cached: CachedOutputs, cost_table: CostTable, *, predictions: Tensor | None = None) -> dict:
    """Accuracy, expected dynamic MACs (heads on the way included), speed-up over the static
    network (``macs[-1]``) and exit distribution of the oracle. ``predictions [E, N]`` replaces
    the exits' argmax (e.g. an ensemble's predictions)."""
    check_cost_table(cost_table, "oracle")
    pred = cached.logits.argmax(-1) if predictions is None else predictions
    e, n = pred.shape
    exit_ = oracle_exit(pred, cached.targets)
    acc = (pred == cached.targets[None]).any(0).float().mean().item()
    macs = torch.tensor(cost_table.dynamic_macs, dtype=torch.float64)[exit_].mean().item()
    full = float(cost_table.macs[-1])
    return {
        "accuracy": acc,
        "expected_macs": macs,
        "full_macs": full,
        "speedup": full / macs if macs > 0 else math.inf,
        "exit_distribution": (torch.bincount(exit_, minlength=e).double() / n).tolist(),
    }


def captured_share(policy_macs: float, oracle_macs: float, full_macs: float) -> float:
    """``(full - policy) / (full - oracle)``: 1 when a policy saves as much as the oracle, 0 when
    it saves nothing, negative when it costs more than the static network; NaN when the oracle
    itself saves nothing."""
    gap = full_macs - oracle_macs
    return (full_macs - policy_macs) / gap if gap > 0 else math.nan
