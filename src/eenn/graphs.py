"""Segments at a few fixed batch sizes, captured as CUDA graphs on a GPU.

On a GPU a small network is bound by kernel launches and host synchronisation, not by the
arithmetic: the dynamic engine at batch 256 launched ~1,000 kernels for 8 batches and lost to the
static network under CUDA graphs. :class:`BucketedSegments` runs each segment (stages and exit
head) only at a small set of batch sizes, the *buckets*: the samples still running are padded up
to the next bucket (zero rows; in eval mode every row is computed independently, so the padding
cannot change a real sample's output) and, on CUDA, segment ``k`` at bucket ``b`` is captured as
a CUDA graph on first use and replayed afterwards, one launch for the whole segment. More
samples than the largest bucket are cut into pieces of that size.

:meth:`BucketedSegments.exits` is the exit loop itself on this footing (what the engine runs for
the ``final`` fallback): the rule's step and the exit decision are captured in the same graph as
the segment, which hands back one small tensor per exit, ``prediction * 2 + fires``; that
device-to-host copy is the one wait per exit. The bookkeeping (who left, who goes on) is done
on the host in NumPy, the survivors are gathered into the next segment's graph inputs, and the
answers go back to the device once, at the end. On a GPU the eager loop's ~20 small kernels and
host syncs per exit (softmax, compare, count, two ``nonzero``, index selects, answer records)
cost more than a small network's segments themselves.

On a CPU the same padding and the same host loop run eagerly (no graphs), which is how the
tests check that the answers do not change.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .network import MultiExitNetwork
from .policies.loop import Running, _cat
from .policies.policy import BoundPolicy

__all__ = ["BucketedSegments", "DEFAULT_BUCKETS"]

DEFAULT_BUCKETS = (1, 4, 16, 64, 256, 1024)


def _rows(state) -> int:
    return (state[0] if isinstance(state, tuple) else state).shape[0]


def _map(fn, v):
    """``fn`` on a tensor, or on each tensor of (nested) tuples; None stays None."""
    if v is None:
        return None
    return tuple(_map(fn, t) for t in v) if isinstance(v, tuple) else fn(v)


def _leaves(v) -> tuple:
    """The tensors of (nested) tuples, in order; None left out."""
    if v is None:
        return ()
    return tuple(t for x in v for t in _leaves(x)) if isinstance(v, tuple) else (v,)


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
        # (what, k, bucket, dtype, device[, copy]) -> (graph, *static inputs, outputs)
        self._graphs: dict[tuple, tuple] = {}
        self._pool = None
        self.calls: Counter[tuple[int, int]] = Counter()  # runs per (segment, bucket), for inspection
        self.step_in_graph = True  # False once a rule's step could not be captured (then it runs eagerly)
        # Graph copies: 0 for the engine's own calls (exits), 1 + 2 * pair + turn for pipelined streams
        self._turns: dict[tuple[int, int, int], int] = {}  # (pair, segment, bucket) -> the turn launched last
        self._pairs: set[int] = set()  # pairs of copies held by open pipelines
        self._host: dict[int, Tensor] = {}  # pinned host buffers for the launched decisions
        self.chained: bool | None = None  # batch 1 as one graph with conditional nodes: False once that failed
        self.chains = 0  # samples run through chain(), for inspection

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def forward_segment(self, k: int, state, prev: Tensor | None = None):
        n = _rows(state)
        top = self.buckets[-1]
        if n > top:  # pieces of the largest bucket, merged again
            parts = [self.forward_segment(k, *_map(lambda t: t[a:a + top], (state, prev))) for a in range(0, n, top)]
            return tuple(_cat([p[i] for p in parts]) for i in range(3))
        b = self.bucket(n)
        self.calls[(k, b)] += 1
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
        key = ("forward", k, b, first.dtype, first.device)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._record(lambda s, p: self.net.forward_segment(k, s, p), state, prev)
        graph, static_state, static_prev, outputs = entry
        _gather((static_state, static_prev), (state, prev), None, b)
        graph.replay()
        return outputs

    def _record(self, fn, *inputs):
        """Capture ``fn(*inputs)`` on static copies of its inputs (each a tensor, a tuple of
        tensors or None): warm up on a side stream, then record into a memory pool shared by all
        the graphs. Returns ``(graph, *static inputs, outputs)``."""
        static = [_map(lambda t: t.clone(), i) for i in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                warm = fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        # The outputs live outside the shared pool, copied there at the end of the graph: in the
        # pool they could sit in memory that a graph captured earlier uses for its intermediates,
        # and replaying that graph before reading them (a pipelined stream does) would overwrite them.
        outputs = _map(torch.empty_like, warm)
        del warm
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            for dst, src in zip(_leaves(outputs), _leaves(fn(*static)), strict=True):
                dst.copy_(src)
        return graph, *static, outputs

    # -- the exit loop with the decision in the graph -----------------------------------
    def exits(self, bound: BoundPolicy, segment: Callable, run: Running, stop: int | None = None):
        """The exit loop (:func:`eenn.policies.loop.run_exits`) for the ``final`` fallback, from
        ``run`` (whose ``index`` is a CPU tensor) through segments ``run.next .. stop-1``:
        ``(rest, answered)`` with ``rest`` the samples still running (a :class:`Running`, index on
        the CPU; None when nobody is left) and ``answered`` a list of ``(positions, predictions,
        exit)`` NumPy chunks. ``segment(k, state, prev)`` is the network's own (eager) segment
        function; ``prev`` is handed on only to networks whose heads cascade.

        Per exit: the graph's replay (its inputs gathered straight into its static buffers), one
        device-to-host copy of ``prediction * 2 + fires``, and, when some samples go on, one
        host-to-device copy of their rows: a handful of calls, since on a GPU every call of the
        framework costs about as much as a small segment's kernels."""
        if bound.fallback != "final":
            raise ValueError("the graphed exit loop answers with the final exit; use run_exits for other fallbacks")
        stop = bound.num_exits if stop is None else min(stop, bound.num_exits)
        index = run.index.numpy()
        inputs = (run.state, run.prev if self.net.cascades else None, run.carry)
        rows = None  # rows of ``inputs`` to run (device tensor; None: the first len(index) rows)
        answered: list[tuple[np.ndarray, np.ndarray, int]] = []
        for k in range(run.next, stop):
            outputs, packed = self._decide(k, bound, segment, inputs, rows, len(index))
            stay = _leave(packed, index, k, answered)
            if stay is None:
                return None, answered
            rows = None if len(stay) == len(index) else torch.as_tensor(stay, device=_device(outputs[0]))
            index = index[stay]
            state, lg, carry = outputs
            inputs = (state, lg if self.net.cascades else None, carry)
        # The caller keeps what is left past the next replay: copies of the rows still running.
        n = len(index)
        take = (lambda t: t[:n].clone()) if rows is None else (lambda t: t.index_select(0, rows))
        state, prev, carry = (_map(take, v) for v in inputs)
        return Running(stop, torch.from_numpy(index), state, run.batch, prev, carry), answered

    def _decide(self, k: int, bound: BoundPolicy, segment: Callable, inputs: tuple, rows: Tensor | None, n: int):
        """Segment ``k`` with the rule's step and decision on ``n`` rows of ``inputs`` (``(state,
        prev, carry)``; the rows ``rows``, or the first ``n``): ``((state, logits, carry),
        packed)``, the outputs with (at least) ``n`` rows, the real ones first, and ``packed =
        prediction * 2 + fires`` of the ``n`` rows as a NumPy array."""
        top = self.buckets[-1]
        if n > top:  # pieces of the largest bucket (each copied out before the next replays)
            real, starts = _real(rows, n, inputs), range(0, n, top)
            sizes = [min(top, n - a) for a in starts]
            parts = [self._decide(k, bound, segment, _map(lambda t: t[a:a + m], real), None, m) for a, m in zip(starts, sizes)]
            outs = [_map(lambda t, m=m: t[:m].clone(), o) for (o, _), m in zip(parts, sizes)]
            return tuple(_cat([o[i] for o in outs]) for i in range(3)), np.concatenate([p for _, p in parts])
        b = self.bucket(n)
        self.calls[(k, b)] += 1
        first = _leaves(inputs[0])[0]
        if not first.is_cuda or self.capture is False:  # eager, padded as a graph would be
            real = _real(rows, n, inputs)
            outputs, packed = self._body(k, bound, segment)(*(_map(lambda t: _pad(t, b), v) for v in real))
            return outputs, packed.cpu().numpy()[:n]
        entry = self._entry(k, b, bound, segment, inputs, rows, n)
        if entry is None:
            return self._decide_graph_free_step(k, b, n, bound, segment, inputs, rows)
        graph, *static, (outputs, packed) = entry
        _gather(tuple(static), inputs, rows, n)
        graph.replay()
        return outputs, packed.cpu().numpy()[:n]

    @staticmethod
    def _body(k: int, bound: BoundPolicy, segment: Callable) -> Callable:
        """Segment ``k``, the rule's step and the decision: ``(state, prev, carry) -> ((state,
        logits, carry), prediction * 2 + fires)``."""
        def body(state, prev, carry):
            st, lg, g = segment(k, state, prev)
            s, carry = bound.step(carry, lg, g, k)
            return (st, lg, carry), _packed(bound, k, s)
        return body

    def _entry(self, k, b, bound, segment, inputs, rows, n, slot: int = 0):
        """The captured graph of segment ``k`` with its step at bucket ``b`` (``slot``: which copy;
        see :meth:`launch`); None when the rule's step cannot be captured (then only the segment is)."""
        if not self.step_in_graph:
            return None
        first = _leaves(inputs[0])[0]
        key = ("step", k, b, first.dtype, first.device, slot)
        entry = self._graphs.get(key)
        if entry is None:
            real = _real(rows, n, inputs)
            try:
                entry = self._graphs[key] = self._record(self._body(k, bound, segment),
                                                         *(_map(lambda t: _pad(t, b), v) for v in real))
            except Exception as e:  # noqa: BLE001 - a step that syncs or copies from the host: keep it out of the graph
                torch.cuda.synchronize()
                self.step_in_graph = False
                warnings.warn(f"the rule's step could not be captured in a CUDA graph ({type(e).__name__}: {e}); "
                              "it runs eagerly after each segment's graph", RuntimeWarning, stacklevel=3)
                return None
        return entry

    # -- batch 1: the whole exit loop in one graph, deeper segments behind conditional nodes --
    def chain(self, bound: BoundPolicy, segment: Callable, x: Tensor) -> Tensor | None:
        """One sample (``x`` of batch 1) through the exit loop for the ``final`` fallback with no
        return to the host: ``[prediction, exit]`` (a long tensor on ``x``'s device), or None
        where this cannot run (then use :meth:`exits`). On CUDA every segment, its step and
        decision are captured in one graph, each deeper segment inside a conditional node that
        runs only if the sample did not leave (CUDA >= 12.4; a capture that fails warns once
        and turns this off); one replay per sample, nothing for the host to wait for. Elsewhere
        the same levels run eagerly, each condition read on the host."""
        if x.shape[0] != 1 or self.buckets[0] != 1 or bound.fallback != "final" or self.chained is False:
            return None
        if not x.is_cuda or self.capture is False:
            result = x.new_zeros(2, dtype=torch.long)
            self._levels(bound, segment, (x, None, None), result, lambda go, fn: fn() if bool(go) else None)
            self.chains += 1
            return result
        if not (self.step_in_graph and hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node")):
            return None
        key = ("chain", tuple(x.shape), x.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._graphs[key] = self._record_chain(bound, segment, x)
            except Exception as e:  # noqa: BLE001 - no conditional nodes here, or an op they cannot hold
                torch.cuda.synchronize()
                self.chained = False
                warnings.warn(f"batch 1 stays on the per-exit graphs: the exit loop could not be captured with "
                              f"conditional nodes ({type(e).__name__}: {e})", RuntimeWarning, stacklevel=3)
                return None
        graph, static_x, result = entry
        static_x.copy_(x)
        graph.replay()
        self.chains += 1
        return result

    def _levels(self, bound: BoundPolicy, segment: Callable, inputs: tuple, result: Tensor, when: Callable) -> None:
        """Segment 0's level on ``inputs``, each level writing ``[prediction, exit]`` into
        ``result`` and handing on to the next through ``when(go_on, next_level)``."""
        last = bound.num_exits - 1

        def level(k: int, inputs: tuple) -> None:
            (st, lg, carry), packed = self._body(k, bound, segment)(*inputs)
            result.copy_(torch.cat([packed >> 1, torch.full_like(packed, k)]))
            if k < last:
                nxt = (st, lg if self.net.cascades else None, carry)
                when((packed & 1).eq(0).reshape(()), lambda: level(k + 1, nxt))

        level(0, inputs)

    def _record_chain(self, bound: BoundPolicy, segment: Callable, x: Tensor):
        static_x, result = x.clone(), x.new_zeros(2, dtype=torch.long)  # outside the pool, as graph outputs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # every level once, unconditionally: lazy set-ups happen outside the capture
            for _ in range(2):
                self._levels(bound, segment, (static_x, None, None), result, lambda go, fn: fn())
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()

        def inside(go: Tensor, fn: Callable) -> None:
            graph.begin_capture_to_if_node(go)
            try:
                fn()
            finally:
                graph.end_capture_to_conditional_node()

        with torch.cuda.graph(graph, pool=self._pool):
            self._levels(bound, segment, (static_x, None, None), result, inside)
        return graph, static_x, result

    # -- one segment launched now, its decision read later (a pipelined stream) ----------
    def open_pipeline(self) -> int:
        """A pair of graph copies for one pipelined stream (:meth:`launch`): streams interleaved
        on one engine, and the engine's own calls in between, never replay a graph whose
        outputs another still has to read. Give it back with :meth:`close_pipeline`."""
        pair = min(set(range(len(self._pairs) + 1)) - self._pairs)
        self._pairs.add(pair)
        return pair

    def close_pipeline(self, pair: int) -> None:
        self._pairs.discard(pair)

    def launch(self, bound: BoundPolicy, segment: Callable, run: Running, pair: int = 0) -> "_Launched":
        """Segment ``run.next`` with its step and decision for the samples of ``run`` (index on
        the CPU), started without waiting for it: :meth:`finish` gives what :meth:`exits` with
        ``stop=run.next + 1`` gives. On CUDA the graph is replayed from one of two copies and
        its decision copied to pinned host memory behind an event, so that the host can start
        the next segment run (the other copy) before reading this one: the GPU is kept busy while
        the host does the bookkeeping. At most two launched runs may be unfinished at a time.
        Elsewhere (a CPU, more samples than the largest bucket, a step that cannot be captured)
        the run completes here."""
        k, n = run.next, len(run)
        inputs = (run.state, run.prev if self.net.cascades else None, run.carry)
        first = _leaves(inputs[0])[0]
        entry = None
        if first.is_cuda and self.capture is not False and n <= self.buckets[-1] and bound.fallback == "final":
            b = self.bucket(n)
            turn = self._turns[(pair, k, b)] = 1 - self._turns.get((pair, k, b), 1)
            entry = self._entry(k, b, bound, segment, inputs, None, n, 1 + 2 * pair + turn)
        if entry is None:
            return _Launched(k, n, run, done=self.exits(bound, segment, run, stop=k + 1))
        self.calls[(k, b)] += 1
        graph, *static, (outputs, packed) = entry
        _gather(tuple(static), inputs, None, n)
        graph.replay()
        host = self._host.get(id(packed))
        if host is None:
            host = self._host[id(packed)] = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _Launched(k, n, run, outputs=outputs, host=host, event=event)

    def finish(self, h: "_Launched"):
        """``(rest, answered)`` of a launched run (see :meth:`launch` and :meth:`exits`)."""
        if h.done is not None:
            return h.done
        h.event.synchronize()
        index, answered = h.run.index.numpy(), []
        stay = _leave(h.host.numpy()[:h.n], index, h.k, answered)
        if stay is None:
            return None, answered
        if len(stay) == h.n:
            take = lambda t: t[:h.n].clone()  # noqa: E731
        else:  # pinned and asynchronous: a plain copy would wait for the run launched after this one
            rows = torch.from_numpy(stay).pin_memory().to(_device(h.outputs[0]), non_blocking=True)
            take = lambda t: t.index_select(0, rows)  # noqa: E731
        state, lg, carry = (_map(take, v) for v in h.outputs)
        return Running(h.k + 1, torch.from_numpy(index[stay]), state, h.run.batch,
                       lg if self.net.cascades else None, carry), answered

    def _decide_graph_free_step(self, k, b, n, bound, segment, inputs, rows):
        """The segment replayed from its graph, the rule's step run eagerly on the real rows."""
        state, prev, carry = inputs
        first = _leaves(state)[0]
        key = ("segment", k, b, first.dtype, first.device)
        entry = self._graphs.get(key)
        if entry is None:
            real = _real(rows, n, (state, prev))
            entry = self._graphs[key] = self._record(lambda s, p: segment(k, s, p), *(_map(lambda t: _pad(t, b), v) for v in real))
        graph, s_state, s_prev, outputs = entry
        _gather((s_state, s_prev), (state, prev), rows, n)
        graph.replay()
        st, lg, g = outputs
        carry = _real(rows, n, carry)
        s, carry = bound.step(carry, lg[:n], None if g is None else g[:n], k)
        return (st, lg, carry), _packed(bound, k, s).cpu().numpy()


class _Launched:
    """A segment run started by :meth:`BucketedSegments.launch`."""

    def __init__(self, k: int, n: int, run: Running, *, done=None, outputs=None, host=None, event=None) -> None:
        self.k, self.n, self.run, self.done = k, n, run, done
        self.outputs, self.host, self.event = outputs, host, event


def _packed(bound: BoundPolicy, k: int, s) -> Tensor:
    """Exit ``k``'s decision as one tensor: ``prediction * 2 + fires`` (the final exit: all fire)."""
    last = k == bound.num_exits - 1
    fire = torch.ones_like(s.prediction, dtype=torch.bool) if last else bound.fires(s.score, k, s.rule)
    return s.prediction.long() * 2 + fire.long()


def _leave(packed: np.ndarray, index: np.ndarray, k: int, answered: list) -> np.ndarray | None:
    """The samples ``index`` that fire at exit ``k`` (``packed``: prediction * 2 + fires) go into
    ``answered``; the rows of those that go on (None: nobody does)."""
    fire, pred = (packed & 1).astype(bool), packed >> 1
    if fire.any():
        answered.append((index[fire], pred[fire], k))
    return None if fire.all() else np.flatnonzero(~fire)


def _real(rows: Tensor | None, n: int, v):
    """The rows ``rows`` of ``v`` (a tensor or nested tuples of them), or its first ``n``."""
    return _map(lambda t: t[:n] if rows is None else t.index_select(0, rows), v)


def _gather(static, values, rows: Tensor | None, n: int) -> None:
    """Rows ``:n`` of the static graph inputs from ``values`` (same structure): its first ``n``
    rows, or the rows ``rows``, gathered straight into the buffer where its layout allows.
    Rows past ``n`` keep whatever they held (padding: eval-mode rows are independent)."""
    for dst, src in zip(_leaves(static), _leaves(values)):
        if rows is None:
            (dst if len(dst) == n else dst[:n]).copy_(src if len(src) == n else src[:n])
        elif dst.is_contiguous():
            torch.index_select(src, 0, rows, out=dst[:n])
        else:
            dst[:n].copy_(src.index_select(0, rows))


def _device(v) -> torch.device:
    return _leaves(v)[0].device
