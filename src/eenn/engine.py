"""Dynamic inference: run the network segment by segment and carry on only the samples that
have not exited yet (batch compaction), so the skipped computation is really skipped, at any
batch size, on CPU and CUDA.

The decisions are made by the exit loop (:func:`eenn.policies.run_exits`), the same code that
the ONNX runner, the serving tiers and the simulation on cached outputs run; the engine only
supplies how a segment is computed (eager or optimised, whole or in micro-batches). Networks
must be in eval mode (BatchNorm then does not depend on the batch make-up): the engine refuses
one in training mode rather than switching it.
"""
from __future__ import annotations

import numbers
from collections import deque
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from .graphs import BucketedSegments
from .inference import OptimizedSegments
from .network import MultiExitNetwork
from .policies.loop import Answers, Running, run_exits, start
from .policies.policy import ExitPolicy, as_policy

__all__ = ["DynamicEngine", "EngineResult"]


class EngineResult(NamedTuple):
    prediction: Tensor  # [B]
    exit: Tensor  # [B] the exit whose answer is given
    depth: Tensor  # [B] the deepest exit computed (== exit unless SDN's fallback answered)
    macs: Tensor  # [B] MACs spent on the sample (heads on the way included)


def _rows(state, start: int, stop: int):
    """Rows ``start:stop`` of a state, as views."""
    return tuple(t[start:stop] for t in state) if isinstance(state, tuple) else state[start:stop]


class DynamicEngine:
    """``DynamicEngine(net, policy)(x) -> EngineResult``, with ``policy`` an
    :class:`~eenn.policies.ExitPolicy` (e.g. from :func:`~eenn.policies.calibrate`), or
    ``DynamicEngine(net, "max_prob", thresholds, fallback=..., **rule_options)``.

    ``net`` must be in eval mode (``net.eval()``); a network in training mode is refused
    rather than switched behind the caller's back.

    ``x``: model inputs (float), or raw uint8 pixels, which the network's input description
    normalises (:meth:`~eenn.MultiExitNetwork.preprocess`); a tensor or a numpy array. Floats of
    another type (float64, float16) are converted to the parameters' type, tensors and numpy
    arrays alike (``net(x)`` refuses them instead). A shape or dtype the network does not take
    is refused up front, saying what it takes.

    ``check_finite=True``: refuse float inputs holding NaN or inf (they would get a confident
    answer from the final exit). It costs one reduction over the input per call: about 7 us at
    batch 1 on a CPU core (2-3% of a call that leaves at the first exit of a small resnet20,
    under 1% of one through the whole network), and on CUDA a wait for the device; ``False``
    skips it.

    ``micro_batch``: run each segment on at most this many samples at a time (the survivors of
    all pieces are merged before the next segment). On CPUs, large batches of high-resolution
    features fall out of cache; pieces of 32-64 keep the early stages as fast per sample as the
    late ones. Results do not depend on it (eval mode). :meth:`static` runs the static
    backbone in the same pieces, the fair baseline for timing.

    ``optimize=True``: run each segment (and :meth:`static`) traced, frozen and optimised for
    inference (:class:`eenn.inference.OptimizedSegments`: BatchNorm folded, ReLU and adds fused,
    oneDNN's layout kept between convolutions on CPU), built on first use; single samples stay
    eager (tracing does not pay at batch 1). Outputs then agree with the eager network to float
    rounding, not bit for bit.

    ``buckets=(1, 4, 16, ...)``: run each segment only at these batch sizes, the samples still
    running padded up to the next one, and on CUDA replay each (segment, bucket) as a CUDA graph
    captured on first use (:class:`eenn.graphs.BucketedSegments`); :meth:`static` then replays
    the backbone captured per batch size. The GPU's path; the answers are the eager engine's.

    ``autocast=torch.bfloat16``: run the segments (and :meth:`static`) under autocast at that
    precision; ``channels_last=True``: images in the channels-last layout (the network is
    converted in place). Both change the arithmetic: use them where
    :func:`eenn.deployments.check_precision` finds the answers hold on the validation split."""

    def __init__(self, net: MultiExitNetwork, policy: ExitPolicy | str, thresholds=None, *,
                 fallback: str | None = None, micro_batch: int | None = None, optimize: bool = False,
                 buckets: Sequence[int] | None = None, autocast: torch.dtype | None = None,
                 channels_last: bool = False, check_finite: bool = True, **policy_options) -> None:
        self.policy = as_policy(policy, thresholds, fallback=fallback, **policy_options)
        if "probs" in self.policy.options:
            raise ValueError("the engine computes ensembles itself: give weights= or ensemble=, not probs=")
        if net.training:
            raise RuntimeError("DynamicEngine: put the network in eval mode: net.eval() (training-mode BatchNorm "
                               "mixes samples)")
        self.net = net
        self.bound = self.policy.bind(net.num_exits, has_gates=net.has_gates)
        self.thresholds = self.bound.thresholds
        if micro_batch is not None and (isinstance(micro_batch, bool) or not isinstance(micro_batch, numbers.Integral)
                                        or micro_batch < 1):
            raise ValueError(f"micro_batch must be a positive whole number of samples or None, got {micro_batch!r}")
        self.micro_batch = None if micro_batch is None else int(micro_batch)
        self.check_finite = check_finite
        self.dynamic_macs = torch.tensor(net.cost().dynamic_macs, dtype=torch.float64)
        self._macs: dict[torch.device, Tensor] = {}  # dynamic_macs on each device used, copied once
        if optimize and buckets is not None:
            raise ValueError("optimize=True (traced segments, for CPUs) and buckets= (CUDA graphs) are alternatives")
        self.optimized = OptimizedSegments(self.net) if optimize else None
        self.graphed = BucketedSegments(self.net, buckets) if buckets is not None else None
        # What runs segment k (``(state, logits, gate)``, as MultiExitNetwork.forward_segment).
        self.forward_segment = self.net.forward_segment
        self._backbone = self.net.backbone
        for fast in (self.optimized, self.graphed):
            if fast is not None:
                self.forward_segment, self._backbone = fast.forward_segment, fast.backbone
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        # The network's own segment function: what the graphed exit loop captures with each decision
        self._eager_segment = self.net.forward_segment
        if autocast is not None:
            device_type = next(self.net.parameters()).device.type

            def under_autocast(fn):
                def run(*args):
                    with torch.autocast(device_type, dtype=autocast, cache_enabled=False):
                        return fn(*args)
                return run

            self.forward_segment, self._backbone, self._eager_segment = (
                under_autocast(f) for f in (self.forward_segment, self._backbone, self._eager_segment))
        # With buckets, the ``final`` fallback runs the exit loop with the decision in the graphs
        # (BucketedSegments.exits); micro-batches and SDN's fallback run the general loop.
        self._graphed_loop = (self.graphed is not None and self.bound.fallback == "final" and micro_batch is None)

    def _segment(self, k: int, state, prev: Tensor | None):
        """Segment ``k`` on the samples still running, in pieces of at most ``micro_batch``
        (the survivors of every piece are merged again before the next segment)."""
        prev = prev if self.net.cascades else None
        mb = self.micro_batch
        n = (state[0] if isinstance(state, tuple) else state).shape[0]
        if mb is None or n <= mb:
            return self.forward_segment(k, state, prev)
        parts = [self.forward_segment(k, _rows(state, a, a + mb), None if prev is None else prev[a:a + mb])
                 for a in range(0, n, mb)]
        states = [p[0] for p in parts]
        st = tuple(torch.cat(t) for t in zip(*states)) if isinstance(states[0], tuple) else torch.cat(states)
        lg = torch.cat([p[1] for p in parts])
        g = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
        return st, lg, g

    def _input(self, x: Tensor) -> Tensor:
        # One rule for tensors and numpy arrays: floats in the parameters' type (numpy's default is float64)
        if isinstance(x, np.ndarray):
            p = next(self.net.parameters(), torch.zeros(()))
            x = torch.as_tensor(x, device=p.device, dtype=p.dtype if np.issubdtype(x.dtype, np.floating) else None)
        elif isinstance(x, Tensor) and x.is_floating_point() and x.dtype != self.net.input_float_dtype:
            x = x.to(self.net.input_float_dtype)
        self.net._check_input(x, "DynamicEngine", pixels=True)
        if x.dtype == torch.uint8:
            x = self.net.preprocess(x).to(self.net.input_float_dtype)
        elif self.check_finite and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError("DynamicEngine: the inputs hold NaN or inf, which would get a confident answer from the "
                             "final exit: clean them (or pass check_finite=False to skip this check)")
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    @torch.no_grad()
    def static(self, x: Tensor) -> Tensor:
        """The static backbone's logits on ``x``, in the same micro-batches: the fair baseline."""
        x, bb = self._input(x), self._backbone
        if self.micro_batch is None or len(x) <= self.micro_batch:
            return bb(x)
        return torch.cat([bb(c) for c in x.split(self.micro_batch)])

    @torch.no_grad()
    def __call__(self, x: Tensor) -> EngineResult:
        if self.net.training:
            raise RuntimeError("put the network in eval mode: training-mode BatchNorm mixes samples")
        x = self._input(x)
        if self._graphed_loop and x.shape[0]:
            return self._graphed(x)
        answers = Answers()
        run_exits(self.bound, start(x), self._segment, answers)
        if len(answers.index) == 1:  # everyone left at one exit (always so at batch 1): no reordering
            pred, exit_, depth = answers.prediction[0], answers.exit[0], answers.depth[0]
        else:
            out = answers.ordered(x.shape[0])
            pred, exit_, depth = out["prediction"], out["exit"], out["depth"]
        return EngineResult(pred, exit_, depth, self._macs_on(x.device)[depth])

    def _graphed(self, x: Tensor) -> EngineResult:
        """The exit loop with the decision in the graphs: answers kept on the host, sent to the
        device in one copy at the end; a single sample in one graph (BucketedSegments.chain)."""
        n = x.shape[0]
        one = self.graphed.chain(self.bound, self._eager_segment, x) if n == 1 else None
        if one is not None:  # batch 1 in one replay: nothing waited for
            one = one.clone()
            return EngineResult(one[:1], one[1:], one[1:], self._macs_on(x.device)[one[1:]])
        _, answered = self.graphed.exits(self.bound, self._eager_segment, Running(0, torch.arange(n), x, n))
        out = np.empty((2, n), dtype=np.int64)
        for pos, pred, k in answered:
            out[0, pos], out[1, pos] = pred, k
        both = torch.from_numpy(out).to(x.device)
        return EngineResult(both[0], both[1], both[1], self._macs_on(x.device)[both[1]])

    def _macs_on(self, device: torch.device) -> Tensor:
        macs = self._macs.get(device)
        if macs is None:
            macs = self._macs[device] = self.dynamic_macs.to(device)
        return macs

    def stream(self, batches: Iterable, *, batch_size: int | None = None) -> Iterator[EngineResult]:
        """Re-batching for throughput (E3, DREX): run a stream of batches with the survivors of
        successive batches pooled at every exit, so that each segment runs on full batches of
        ``batch_size`` samples (default: the size of the first batch) rather than on the
        shrinking remnants of one batch. Yields one :class:`EngineResult` per input batch, in
        input order, as soon as all its samples are answered; its rows and answers are those
        of ``engine(batch)`` (eval mode: a sample's answer does not depend on its batch mates).

        ``batches``: an iterable of inputs as :meth:`__call__` takes them (model inputs or raw
        uint8 pixels), or of ``(x, y, ...)`` tuples such as a :class:`~eenn.TensorLoader`
        yields (the first element is the input).

        Scheduling: segment ``k`` has a queue of waiting samples, oldest first. While some queue
        holds a full batch, the deepest such queue runs one batch (its survivors join queue
        ``k+1``); only when none is full is the next input batch read into queue 0. Running the
        deepest first answers the oldest samples first and keeps fewer than ``batch_size``
        samples waiting before each segment (plus the batch being read). When the input is
        exhausted the queues are flushed from the shallowest to the deepest, in full batches
        while they last: only then does a segment run on fewer samples.

        With ``buckets`` (CUDA graphs) the runs are pipelined: a segment run is launched, and the
        previous one's decision read (and its survivors queued) only after that, so the GPU works
        on the one while the host does the other's bookkeeping; the run chosen next does not
        count the survivors still in flight. Streams may be interleaved on one engine, and the
        engine called in between: each stream replays its own copies of the graphs."""
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive number of samples or None, got {batch_size!r}")
        batch_size = None if batch_size is None else int(batch_size)
        if self.net.training:
            raise RuntimeError("put the network in eval mode: training-mode BatchNorm mixes samples")
        return self._stream(iter(batches), batch_size)

    def _stream(self, batches: Iterator, size: int | None) -> Iterator[EngineResult]:
        pair = self.graphed.open_pipeline() if self._graphed_loop else None
        try:
            yield from self._pooled(batches, size, pair)
        finally:  # also when the consumer stops early: the pair of graph copies is free again
            if pair is not None:
                self.graphed.close_pipeline(pair)

    @torch.no_grad()
    def _pooled(self, batches: Iterator, size: int | None, pair: int | None) -> Iterator[EngineResult]:
        num = self.net.num_exits
        queues = [deque() for _ in range(num)]  # Running pieces before segment k, oldest first
        waiting = [0] * num  # samples in each queue
        sizes: deque[int] = deque()  # input batches not yet yielded, in input order
        base = 0  # sample id of the first sample of sizes[0]
        read = 0  # samples read so far: the id of the next one
        # answers of samples base .. read-1, on the host ("done": answered yet); the graphed loop
        # keeps the running samples' ids on the host too
        buf = {f: np.zeros(0, dtype=np.int64) for f in ("prediction", "exit", "depth")}
        buf["done"] = np.zeros(0, dtype=bool)
        graphed = self._graphed_loop
        device = None

        inflight: deque = deque()  # graphed runs launched and not yet read (at most two)

        def run(k: int, n: int) -> None:
            pieces, got = [], 0
            while got < n:
                piece = queues[k].popleft()
                if got + len(piece) > n:
                    piece, rest = piece.split(n - got)
                    queues[k].appendleft(rest)
                pieces.append(piece)
                got += len(piece)
            waiting[k] -= got
            if graphed:  # launched now, read once the next run is launched: the GPU never waits for the host
                inflight.append(self.graphed.launch(self.bound, self._eager_segment, Running.cat(pieces), pair))
                if len(inflight) > 1:
                    settle(inflight.popleft())
                return
            answers = Answers()
            left = run_exits(self.bound, Running.cat(pieces), self._segment, answers, stop=k + 1)
            record(k, left, [tuple(t.cpu().numpy() for t in chunk)
                             for chunk in zip(answers.index, answers.prediction, answers.exit, answers.depth)])

        def settle(h) -> None:
            left, answered = self.graphed.finish(h)
            record(h.k, left, [(pos, pred, e, e) for pos, pred, e in answered])

        def record(k: int, left: Running | None, answered: list) -> None:
            if left is not None:
                queues[k + 1].append(left)
                waiting[k + 1] += len(left)
            for idx, pred, exit_, depth in answered:
                pos = idx - base
                buf["prediction"][pos], buf["exit"][pos], buf["depth"][pos] = pred, exit_, depth
                buf["done"][pos] = True

        def ready() -> Iterator[EngineResult]:
            nonlocal base
            while sizes and bool(buf["done"][:sizes[0]].all()):
                b = sizes.popleft()
                out = torch.from_numpy(np.stack([buf[f][:b] for f in ("prediction", "exit", "depth")]))
                # pinned and asynchronous: a plain copy to the GPU would wait for the runs in flight
                out = out.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else out.to(device)
                for f in buf:
                    buf[f] = buf[f][b:]
                base += b
                yield EngineResult(out[0], out[1], out[2], self._macs_on(device)[out[2]])

        for x in batches:
            if isinstance(x, (tuple, list)):
                x = x[0]
            x = self._input(x)
            b = x.shape[0]
            device = x.device if device is None else device
            if size is None and b:
                size = b
            if b:
                for f, t in buf.items():
                    buf[f] = np.concatenate([t, np.zeros(b, dtype=t.dtype)])
                for a, piece in zip(range(0, b, size), x.split(size)):  # views: no copy, none to re-split
                    if graphed:  # sample ids on the host
                        m = piece.shape[0]
                        queues[0].append(Running(0, torch.arange(read + a, read + a + m), piece, read + a + m))
                    else:
                        queues[0].append(start(piece, offset=read + a))
                waiting[0] += b
            sizes.append(b)
            read += b
            del x
            while True:  # the deepest full queue runs first; the next batch is read when none is full
                k = next((k for k in reversed(range(num)) if size is not None and waiting[k] >= size), None)
                if k is None:
                    break
                run(k, size)
                yield from ready()
            yield from ready()
        for k in range(num):  # flush, shallowest first: deeper queues collect the survivors
            while inflight:
                settle(inflight.popleft())
            while waiting[k]:
                run(k, min(size, waiting[k]))
                yield from ready()
        while inflight:
            settle(inflight.popleft())
        yield from ready()
        if sizes:
            raise RuntimeError(f"{len(sizes)} batches have unanswered samples")  # cannot happen
