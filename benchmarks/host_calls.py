"""Framework calls the exit loop makes outside the captured graphs, per batch.

On a GPU a small network's segments take tens of microseconds each, and every PyTorch call the
host makes around them (a kernel launch, a sync, a small copy) costs about as much. This counts
the calls (ATen operators dispatched) that the exit loop makes outside what a CUDA graph replays:

- the general loop (``DynamicEngine(net, policy)``), counting each segment as one replay: the
  rule's step, the decision, compaction and answer records run as separate calls;
- the loop with the decision in the graphs (``DynamicEngine(net, policy, buckets=...)``),
  counting each segment with its rule and decision as one replay.

Run on a CPU (no CUDA needed): the bucketed path then pads eagerly, so its count includes the
padding, which a GPU does by copying into the graph's static inputs instead.

    .venv/bin/python benchmarks/host_calls.py [--batch 64]
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _helpers import spread_net  # noqa: E402

from eenn.engine import DynamicEngine  # noqa: E402


class Calls(TorchDispatchMode):
    """Counts the ATen operators dispatched while ``on``."""

    def __init__(self) -> None:
        super().__init__()
        self.on, self.ops = True, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on:
            self.ops[str(func).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))

    def replayed(self, fn):
        """``fn`` counted as one replay (nothing inside it is counted)."""
        def run(*a, **k):
            was, self.on = self.on, False
            try:
                return fn(*a, **k)
            finally:
                self.on = was
        return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args()
    net = spread_net("linear")  # a small ResNet-20 with three early exits
    torch.manual_seed(0)
    x = torch.randn(a.batch, 1, 8, 8)
    with torch.no_grad():
        out = net(x)
        th = [float(out.logits[k].softmax(-1).max(-1).values.median()) for k in range(net.num_exits - 1)]
    calls = Calls()
    general = DynamicEngine(net, "max_prob", th)
    general.forward_segment = calls.replayed(net.forward_segment)
    graphed = DynamicEngine(net, "max_prob", th, buckets=(a.batch,))
    body = graphed.graphed._body
    graphed.graphed._body = lambda k, bound, segment: calls.replayed(body(k, bound, segment))
    for label, eng in (("general loop", general), ("decision in the graphs", graphed)):
        calls.ops = Counter()
        with calls:
            r = eng(x)
        per_exit = r.exit.bincount(minlength=net.num_exits).tolist()
        top = ", ".join(f"{k} {v}" for k, v in calls.ops.most_common(6))
        print(f"{label}: {sum(calls.ops.values())} calls outside the graphs for a batch of {a.batch} "
              f"(samples per exit {per_exit}); most: {top}")


if __name__ == "__main__":
    main()
