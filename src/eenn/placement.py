"""Where exits go: stage indices or names, every stage, or by cumulative cost with EENets'
distributions (METHODS.md §2)."""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .backbones.base import Backbone
from .cost import count_macs, profile_stages

__all__ = ["EXIT_DISTRIBUTIONS", "ExitSpec", "cost_thresholds", "nachos_pools", "place_exits"]

# Where to put exits: stage indices or names, "all", "none", or a cost distribution given
# as {"distribution": "fine", "num_exits": 2} or the short string "fine:2".
ExitSpec = Union[str, Sequence[Union[int, str]], dict]

GOLDEN_RATIO = 1.61803398875
EXIT_DISTRIBUTIONS = ("linear", "golden", "pareto", "fine")


def cost_thresholds(distribution: str, num_exits: int) -> list[float]:
    """EENets' placement rule: exit i goes where the cumulative cost first reaches
    ``fraction[i]`` of the whole network's (METHODS.md §2)."""
    n = num_exits
    if n < 1:
        raise ValueError(f"num_exits must be >= 1, got {n}")
    if distribution == "linear":
        return [(i + 1) / (n + 1) for i in range(n)]
    if distribution == "golden":
        return [GOLDEN_RATIO ** (i - n) for i in range(n)]
    if distribution == "pareto":
        return [1 - 0.8 ** (i + 1) for i in range(n)]
    if distribution == "fine":
        return [1 - 0.95 ** (i + 1) for i in range(n)]
    raise ValueError(f"unknown exit distribution {distribution!r}; choose one of {', '.join(EXIT_DISTRIBUTIONS)}")


def place_exits(spec: ExitSpec, backbone: Backbone) -> list[int]:
    """Resolve an exit specification into sorted stage indices (the final classifier, after
    the last stage, is always an exit and is not listed)."""
    n = backbone.num_stages
    names = [s.name for s in backbone.stage_info]
    if isinstance(spec, str) and ":" in spec:
        dist, _, k = spec.partition(":")
        if not k.isdigit():
            raise ValueError(f"exit placement {spec!r}: expected '<distribution>:<number of exits>', e.g. 'fine:2'")
        spec = {"distribution": dist, "num_exits": int(k)}
    if spec == "all":
        return list(range(n - 1))
    if spec in ("none", None):
        return []
    if isinstance(spec, dict):
        unknown = set(spec) - {"distribution", "num_exits"}
        if unknown or "num_exits" not in spec:
            raise ValueError(f"exit placement dict takes 'distribution' and 'num_exits', got keys {sorted(spec)}")
        return _place_by_cost(spec.get("distribution", "fine"), int(spec["num_exits"]), backbone)
    if isinstance(spec, str):
        raise ValueError(f"exit placement {spec!r} not understood: use 'all', 'none', a list of stages, or e.g. 'fine:2'")
    out = []
    for s in spec:
        if isinstance(s, str):
            if s not in names:
                raise ValueError(f"no stage named {s!r}; stages are: {', '.join(names)}")
            s = names.index(s)
        i = int(s) + n if int(s) < 0 else int(s)
        if not 0 <= i < n - 1:
            raise ValueError(
                f"cannot attach an exit after stage {s}: valid stages are 0..{n - 2} "
                f"(stage {n - 1} is the last one and feeds the final classifier)"
            )
        out.append(i)
    if len(set(out)) != len(out):
        raise ValueError(f"exit stages must be distinct, got {list(spec)}")
    return sorted(out)


def _place_by_cost(distribution: str, num_exits: int, backbone: Backbone) -> list[int]:
    fractions = cost_thresholds(distribution, num_exits)
    n = backbone.num_stages
    if num_exits > n - 1:
        raise ValueError(f"cannot place {num_exits} exits: this backbone has {n - 1} stages that can carry one")
    stage_macs, cls_macs = profile_stages(backbone.stages, backbone.classifier, backbone.input_shape,
                                          backbone.input_dtype)
    total = sum(stage_macs) + cls_macs
    cum = torch.tensor(stage_macs, dtype=torch.float64).cumsum(0).tolist()
    out: list[int] = []
    for i, frac in enumerate(fractions):
        # The first stage reaching the threshold that carries no exit yet (two thresholds can
        # fall in one stage when stages are coarse; the later exit moves one stage on).
        start = out[-1] + 1 if out else 0
        idx = next((j for j in range(start, n) if cum[j] >= frac * total), n - 1)
        if idx >= n - 1:
            raise ValueError(
                f"distribution {distribution!r} puts exit {i} at {100 * frac:.1f}% of the cost, past the last "
                f"stage that can carry an exit; use fewer exits or another distribution"
            )
        out.append(idx)
    return out


def nachos_pools(backbone: Backbone, stages: Sequence[int], names: Sequence[str],
                 options: Sequence[dict]) -> dict[int, int]:
    """NACHOS' adaptive pooling for the ``nachos`` heads given ``pool="adaptive"``: ``{exit:
    kernel}``. From the last early exit to the first, as NACHOS' ``get_intermediate_classifiers_
    adaptive`` does: an exit's MACs (the backbone up to its stage plus its head) are compared
    with the next exit's (the final one: the whole backbone), and its head's max-pool kernel is
    raised 1 -> 2 -> 4 while they are not below them. The largest kernel follows the exit's
    channels, as there: 4 from 16 channels, 2 from 8, else 1. Other heads count as built."""
    from .heads import create_head

    if not any(n == "nachos" and o.get("pool") == "adaptive" for n, o in zip(names, options)):
        return {}
    stage_macs, cls_macs = profile_stages(backbone.stages, backbone.classifier, backbone.input_shape,
                                          backbone.input_dtype)
    cum = torch.tensor(stage_macs, dtype=torch.int64).cumsum(0).tolist()
    nxt, pools = cum[-1] + cls_macs, {}

    def macs(k: int, **change) -> int:
        shape = backbone.stage_info[stages[k]].shape
        opts = {**options[k], **change}
        if k == 0:
            opts.pop("cascade", None)
        head = create_head(names[k], shape, backbone.num_classes, backbone=backbone, **opts).eval()
        prev = (torch.zeros(1, backbone.num_classes),) if head.cascades else ()
        return cum[stages[k]] + count_macs(head, torch.zeros(1, *shape), *prev)

    for k in reversed(range(len(stages))):
        if names[k] == "nachos" and options[k].get("pool") == "adaptive":
            channels = backbone.stage_info[stages[k]].shape[0]
            top = 4 if channels >= 16 else 2 if channels >= 8 else 1
            kernel, mine = 1, macs(k, pool=1)
            while mine >= nxt and kernel < top:
                kernel *= 2
                mine = macs(k, pool=kernel)
            pools[k] = kernel
        else:
            mine = macs(k)
        nxt = mine
    return pools
