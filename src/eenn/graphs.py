"""Segments at a few fixed batch sizes, captured as CUDA graphs on a GPU.

On a GPU a small network is bound by kernel launches and host synchronisation, not by the
arithmetic: the dynamic engine at batch 256 launched ~1,000 kernels for 8 batches and lost to the
static network under CUDA graphs. :class:`BucketedSegments` runs each segment (stages and exit
head) only at a small set of batch sizes, the *buckets*: the samples still running are padded up
to the next bucket (zero rows; in eval mode every row is computed independently, so the padding
cannot change a real sample's output) and, on CUDA, segment ``k`` at bucket ``b`` is captured as
a CUDA graph on first use and replayed afterwards, one launch for the whole segment. More
samples than the largest bucket are cut into pieces of that size.

The exit decision stays in the exit loop (:mod:`eenn.policies.loop`): one small device-to-host
copy per exit (how many samples fire) is all it waits for. On a CPU the same padding runs
eagerly (no graphs), which is how the tests check that the answers do not change.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .network import MultiExitNetwork

__all__ = ["BucketedSegments", "DEFAULT_BUCKETS"]

DEFAULT_BUCKETS = (1, 4, 16, 64, 256, 1024)


def _rows(state) -> int:
    return (state[0] if isinstance(state, tuple) else state).shape[0]


def _map(fn, state):
    if state is None:
        return None
    return tuple(fn(t) for t in state) if isinstance(state, tuple) else fn(state)


def _pad(t: Tensor, b: int) -> Tensor:
    n = t.shape[0]
    return t if n == b else torch.cat([t, t.new_zeros((b - n, *t.shape[1:]))])


class BucketedSegments:
    """``forward_segment(k, state, prev)`` as :meth:`MultiExitNetwork.forward_segment`, run at the
    next bucket size up (and captured as a CUDA graph per segment and bucket when the input is
    on a CUDA device and ``capture`` is not False)."""

    def __init__(self, net: MultiExitNetwork, buckets: Sequence[int] = DEFAULT_BUCKETS, *,
                 capture: bool | None = None) -> None:
        if net.training:
            raise RuntimeError("put the network in eval mode: padded rows must not touch BatchNorm statistics")
        b = sorted({int(v) for v in buckets})
        if not b or b[0] < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {list(buckets)}")
        self.net, self.buckets, self.capture = net, b, capture
        self._graphs: dict[tuple, tuple] = {}  # (k, bucket, dtype, device) -> (graph, inputs, outputs)
        self._pool = None
        self.calls: list[tuple[int, int]] = []  # (segment, bucket) of every run, for inspection

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def forward_segment(self, k: int, state, prev: Tensor | None = None):
        n = _rows(state)
        top = self.buckets[-1]
        if n > top:  # pieces of the largest bucket, merged again
            parts = [self.forward_segment(k, _map(lambda t: t[a:a + top], state),
                                          None if prev is None else prev[a:a + top]) for a in range(0, n, top)]
            st = [p[0] for p in parts]
            st = tuple(torch.cat(x) for x in zip(*st)) if isinstance(st[0], tuple) else torch.cat(st)
            g = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
            return st, torch.cat([p[1] for p in parts]), g
        b = self.bucket(n)
        self.calls.append((k, b))
        state_b, prev_b = _map(lambda t: _pad(t, b), state), None if prev is None else _pad(prev, b)
        first = state_b[0] if isinstance(state_b, tuple) else state_b
        graphed = first.is_cuda and self.capture is not False
        out = self._replay(k, b, state_b, prev_b) if graphed else self.net.forward_segment(k, state_b, prev_b)
        cut = (lambda t: t[:n].clone()) if graphed else (lambda t: t[:n])  # graph outputs are reused buffers
        new_state, logits, gate = out
        return _map(cut, new_state), cut(logits), None if gate is None else cut(gate)

    def backbone(self, x: Tensor) -> Tensor:
        """The static backbone's logits; on CUDA replayed from a graph captured per input shape
        (the static network under CUDA graphs: the baseline the early exit must beat)."""
        if not x.is_cuda or self.capture is False:
            return self.net.backbone(x)
        key = ("backbone", tuple(x.shape), x.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._record(lambda s, p: self.net.backbone(s), x, None)
        graph, static_x, _, out = entry
        static_x.copy_(x)
        graph.replay()
        return out.clone()

    def _replay(self, k: int, b: int, state, prev):
        first = state[0] if isinstance(state, tuple) else state
        key = (k, b, first.dtype, first.device)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._record(lambda s, p: self.net.forward_segment(k, s, p), state, prev)
        graph, static_state, static_prev, outputs = entry
        for dst, src in zip(static_state if isinstance(static_state, tuple) else (static_state,),
                            state if isinstance(state, tuple) else (state,)):
            dst.copy_(src)
        if static_prev is not None:
            static_prev.copy_(prev)
        graph.replay()
        return outputs

    def _record(self, fn, state, prev):
        """Capture ``fn(state, prev)`` on static copies of its inputs: warm up on a side stream,
        then record into a memory pool shared by all the graphs."""
        static_state = _map(lambda t: t.clone(), state)
        static_prev = None if prev is None else prev.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(static_state, static_prev)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = fn(static_state, static_prev)
        return graph, static_state, static_prev, outputs
