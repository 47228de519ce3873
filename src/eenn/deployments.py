"""Early exit against the best static deployment: every way eenn can run a network on this
machine, the static network and the early-exit network on each, timed side by side.

A user compares an early-exit network with the fastest way they already have to run the static
one, not with eager PyTorch. So the speed-up that counts is the fastest early-exit path's over
the fastest static path (each named), and the figure of merit is that speed-up divided by the
MAC speed-up the policy promises on the same samples (1.0: every MAC saved shows on the clock).

Paths (:func:`deployments`):

- ``PyTorch eager``: the backbone / :class:`~eenn.engine.DynamicEngine`;
- ``PyTorch optimised`` (CPU): both traced, frozen and optimised for inference
  (:class:`~eenn.inference.OptimizedSegments`; batch 1 stays eager there);
- ``PyTorch + CUDA graphs`` (CUDA): the backbone captured per batch size / the engine with its
  segments captured per bucket size (:mod:`eenn.graphs`);
- ``PyTorch + CUDA graphs, bf16, channels-last`` (CUDA, where :func:`check_precision` finds
  the answers hold on the validation split): the same in reduced precision;
- ``..., re-batched`` (CUDA, for each of the two): the early exit run over the whole stream of
  batches with the survivors of successive batches pooled into full batches at every exit
  (:meth:`~eenn.engine.DynamicEngine.stream`, E3/DREX; batches of the input's size, at most the
  largest bucket); the answers per batch are the engine's;
- ``onnxruntime, N thread(s)`` (CPU, when onnxruntime is installed), for 1 thread and for
  torch's thread count: the static network as one graph (``static.onnx``) / the staged runner
  (one call of a fused graph per batch, the exit loop and its compaction inside; see
  :mod:`eenn.fused`);
- ``onnxruntime, N x 1 thread`` (the same, for torch's N > 1 threads): a batch cut into N
  parts run at once on N single-thread sessions / runners (:class:`BatchParallel`). onnxruntime's
  own threads split every operator, and a small network's operators are too small to split well
  (a width-64 ViT at batch 256 on 2 cores: 0.046 ms per sample at 2 threads, 0.035 as 2 x 1).
"""
from __future__ import annotations

import copy
import importlib.util
import threading
import statistics
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from .engine import DynamicEngine
from .graphs import DEFAULT_BUCKETS
from .network import MultiExitNetwork
from .policies import ExitPolicy

__all__ = ["BatchParallel", "Deployment", "check_precision", "deployments", "time_deployments", "format_deployments"]


class Deployment(NamedTuple):
    name: str
    static: Callable[[Tensor], Any]  # the static network on a batch of model inputs
    early: Callable[[Tensor], Any]  # the early-exit network on the same batch
    # True: ``early`` takes the whole list of batches at once (a re-batching stream,
    # :meth:`~eenn.engine.DynamicEngine.stream`); ``static`` still takes one batch
    stream: bool = False


class BatchParallel:
    """``BatchParallel(workers)(x)``: the batch ``x`` (a NumPy array) cut into ``len(workers)``
    contiguous parts, each answered by its own worker at the same time, the answers joined in
    batch order. A worker is a callable on a part that returns a NumPy array, a list or tuple of
    them, or a dict of them (an onnxruntime session's ``run`` wrapped, a
    :class:`~eenn.staged.StagedRunner`), each holding its own runtime state, e.g. one thread
    each: onnxruntime releases the GIL while it runs, so the parts run in parallel on Python
    threads. A batch with fewer rows than workers uses the first workers only. An error in any
    worker is raised here."""

    def __init__(self, workers: Sequence[Callable[[np.ndarray], Any]]) -> None:
        self.workers = list(workers)
        if not self.workers:
            raise ValueError("BatchParallel needs at least one worker")
        self._pool = ThreadPoolExecutor(len(self.workers) - 1, thread_name_prefix="eenn-part") if len(self.workers) > 1 else None
        self._lock = threading.Lock()  # a worker (a session, a runner) takes one part at a time

    def __call__(self, x: np.ndarray) -> Any:
        parts = [p for p in np.array_split(np.asarray(x), len(self.workers)) if len(p)] or [np.asarray(x)]
        with self._lock:
            later = [self._pool.submit(w, p) for w, p in zip(self.workers[1:], parts[1:])] if self._pool else []
            outs = [self.workers[0](parts[0])] + [f.result() for f in later]
        return _join(outs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _join(outs: list) -> Any:
    first = outs[0]
    if len(outs) == 1:
        return first
    if isinstance(first, dict):
        return {k: np.concatenate([o[k] for o in outs]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(np.concatenate(col) for col in zip(*outs))
    return np.concatenate(outs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def check_precision(net: MultiExitNetwork, policy: ExitPolicy, val, *, autocast: torch.dtype | None = torch.bfloat16,
                    channels_last: bool = False, max_drop: float = 0.001, batch_size: int = 512) -> dict[str, Any]:
    """Whether reduced precision (``autocast``) and/or the channels-last layout keep the early
    exit's answers on a validation split (a ``TensorDataset`` of raw pixels, or
    :class:`~eenn.outputs.CachedOutputs`-like ``(x, targets)``): the accuracy of the engine so
    configured against the float32 engine's, on the same device, and the share of samples whose
    exit and answer both agree. ``held``: the accuracy dropped by at most ``max_drop``."""
    x, y = (val.x, val.y) if hasattr(val, "x") else val
    dev = next(net.parameters()).device
    ref = DynamicEngine(net, policy)
    low = DynamicEngine(copy.deepcopy(net), policy, autocast=autocast, channels_last=channels_last)
    right = [0, 0]
    same = 0
    for a in range(0, len(x), batch_size):
        xb, yb = x[a:a + batch_size].to(dev), y[a:a + batch_size].to(dev)
        r, q = ref(xb), low(xb)
        right[0] += int((r.prediction == yb).sum())
        right[1] += int((q.prediction == yb).sum())
        same += int(((r.prediction == q.prediction) & (r.exit == q.exit)).sum())
    n = max(len(x), 1)
    acc32, acc = right[0] / n, right[1] / n
    return {"autocast": str(autocast).removeprefix("torch.") if autocast is not None else None,
            "channels_last": channels_last, "samples": len(x), "float32_accuracy": acc32, "accuracy": acc,
            "agreement": same / n, "held": acc32 - acc <= max_drop + 1e-12}


def deployments(net: MultiExitNetwork, policy: ExitPolicy, *, device: torch.device | str = "cpu",
                paths: str = "all", onnx_dir: str | None = None, val=None) -> list[Deployment]:
    """The paths this machine offers for ``net`` with ``policy`` (see the module docstring);
    ``paths="eager"``: PyTorch eager only (quick). ``onnx_dir``: an export of this network and
    policy to reuse (otherwise one is written to a temporary directory). ``val``: a validation
    split on which, on CUDA, bf16 with channels-last is checked (:func:`check_precision`) and,
    where the accuracy holds, timed as one more path."""
    if paths not in ("all", "eager"):
        raise ValueError(f"paths must be 'all' or 'eager', got {paths!r}")
    device = torch.device(device)
    net = net.eval().to(device)
    out = [Deployment("PyTorch eager", net.backbone, DynamicEngine(net, policy))]
    if paths == "eager":
        return out
    if device.type == "cuda":  # launches and host syncs dominate a GPU: segments and backbone as CUDA graphs
        graphed = DynamicEngine(net, policy, buckets=DEFAULT_BUCKETS)
        engines = [("PyTorch + CUDA graphs", graphed)]
        if val is not None and check_precision(net, policy, val, channels_last=True)["held"]:
            engines.append(("PyTorch + CUDA graphs, bf16, channels-last",
                            DynamicEngine(copy.deepcopy(net), policy, buckets=DEFAULT_BUCKETS, autocast=torch.bfloat16,
                                          channels_last=True)))
        for name, eng in engines:
            out.append(Deployment(name, eng.static, eng))
            # survivors pooled into batches of the input's size, at most the largest bucket
            out.append(Deployment(f"{name}, re-batched", eng.static, lambda batches, e=eng: list(
                e.stream(batches, batch_size=min(len(batches[0]), DEFAULT_BUCKETS[-1]))), stream=True))
    if device.type != "cpu":  # tracing and freezing is for CPUs (on an H200 its outputs drifted and it stayed eager)
        return out
    opt = DynamicEngine(net, policy, optimize=True)
    out.append(Deployment("PyTorch optimised", opt.static, opt))
    if importlib.util.find_spec("onnxruntime") is None:  # the serve extra is not installed
        return out
    from .exporter import export
    from .staged import StagedRunner, _caller, _session

    d = onnx_dir or tempfile.mkdtemp(prefix="eenn-deploy-")
    if onnx_dir is None:
        try:
            export(net, d, policy=policy)
        except Exception as e:  # noqa: BLE001 - a network the exporter cannot take: time the PyTorch paths
            warnings.warn(f"onnxruntime paths left out: the network could not be exported ({type(e).__name__}: {e})",
                          RuntimeWarning, stacklevel=2)
            return out
    static_bytes = open(f"{d}/static.onnx", "rb").read()
    for threads in sorted({1, torch.get_num_threads()}):
        # the static graph called as the runner calls its graphs (without the Python wrapper's checks)
        call = _caller(_session(static_bytes, threads))
        runner = StagedRunner(d, threads=threads, policy=policy)
        name = f"onnxruntime, {threads} thread{'s' if threads > 1 else ''}"
        out.append(Deployment(name, lambda x, c=call: c({"input": x.numpy()}),
                              lambda x, r=runner: r(x.numpy())))
    n = torch.get_num_threads()
    if n > 1:  # the batch split over n single-thread sessions / runners
        static = BatchParallel([lambda v, c=_caller(_session(static_bytes, 1)): c({"input": v}) for _ in range(n)])
        early = BatchParallel([StagedRunner(d, threads=1, policy=policy) for _ in range(n)])
        out.append(Deployment(f"onnxruntime, {n} x 1 thread", lambda x: static(x.numpy()), lambda x: early(x.numpy())))
    return out


@torch.no_grad()
def time_deployments(net: MultiExitNetwork, policy: ExitPolicy, x: Tensor, batch_sizes: Sequence[int], *,
                     samples: Sequence[int] | None = None, repeats: int = 5, paths: list[Deployment] | None = None,
                     settle: float = 0.1, warm: float = 0.05) -> dict[str, Any]:
    """Milliseconds per sample of the static and the early-exit network on every path, over the
    model inputs ``x`` cut into batches of each size (the first ``samples[i]`` of them for the
    i-th size, or all of them where there are fewer): one untimed pass, then ``repeats`` timed passes with every path's static and
    early-exit runs interleaved (a change in machine load hits all alike); medians.

    ``settle`` seconds pass between two timed runs. A runtime's worker threads keep spinning for
    tens of milliseconds after a run (onnxruntime's pools, OpenMP's), waiting for the next one;
    timed right after another path, a path shares the cores with those threads, which a
    deployment running one network never does (on 2 cores, onnxruntime at 2 threads, batch 1:
    0.27 ms per sample for the static graph timed right after the early-exit graph, 0.21 after a
    50 ms pause; the early-exit graph 0.19 against 0.13). After the pause the path runs untimed
    for ``warm`` seconds: cores left idle for 0.1 s (here, a virtual machine's) take tens of
    milliseconds to come back to speed, which a short timed run then pays in full (a width-64
    ViT at batch 256 as 2 x 1 thread: 0.017 ms per sample timed straight after the pause,
    0.009 after 50 ms of warm-up or without the pause), and a deployment serving steadily never does.

    Per batch size: the fastest static path and the fastest early-exit path (named), the
    speed-up of the one over the other, the MAC speed-up the policy gives on these samples, and
    their ratio; ``worst_ratio`` over the batch sizes."""
    if repeats < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"need repeats >= 1 and batch sizes >= 1, got {repeats} and {list(batch_sizes)}")
    net = net.eval()
    paths = paths if paths is not None else deployments(net, policy, device=x.device)
    counts = list(samples) if samples is not None else [len(x)] * len(batch_sizes)
    if len(counts) != len(batch_sizes) or min(counts) < 1:
        raise ValueError(f"need one sample count >= 1 per batch size, got {counts} for batch sizes {list(batch_sizes)}")
    counts = [min(int(n), len(x)) for n in counts]  # as many as there are: times are divided by what ran
    full = float(net.cost().macs[-1])
    engine = DynamicEngine(net, policy)
    rows = []
    for b, n in zip(batch_sizes, counts):
        batches = list(x[:n].split(b))
        spent = torch.cat([engine(c).macs for c in batches]).double().mean().item()

        def run(fn, whole=False):
            def over(bs):  # ``fn`` once on the list of batches (a stream), or once per batch
                if whole:
                    fn(bs)
                else:
                    for c in bs:
                        fn(c)

            _sync(x.device)
            time.sleep(settle)  # the previous path's spinning threads go idle (see above)
            t0, i = time.perf_counter(), 0
            while time.perf_counter() - t0 < warm:  # then the cores come back to speed (see above)
                over(batches if whole else [batches[i % len(batches)]])
                i += 1
            _sync(x.device)
            t0 = time.perf_counter()
            over(batches)
            _sync(x.device)
            return time.perf_counter() - t0

        times: dict[str, tuple[list[float], list[float]]] = {p.name: ([], []) for p in paths}
        for rep in range(repeats + 1):
            for p in paths:
                s, e = run(p.static), run(p.early, p.stream)
                if rep:  # the first pass warms up (traces, allocations, caches)
                    times[p.name][0].append(s)
                    times[p.name][1].append(e)
        per = {name: (1e3 * statistics.median(s) / n, 1e3 * statistics.median(e) / n) for name, (s, e) in times.items()}
        best_static = min(per, key=lambda k: per[k][0])
        best_early = min(per, key=lambda k: per[k][1])
        speedup = per[best_static][0] / per[best_early][1]
        rows.append({"batch_size": b, "samples": n, "paths": {k: {"static_ms": v[0], "early_ms": v[1]} for k, v in per.items()},
                     "best_static": best_static, "best_early": best_early, "speedup": speedup,
                     "mac_speedup": full / spent, "ratio": speedup * spent / full})
    return {"rows": rows, "repeats": repeats, "threads": torch.get_num_threads(),
            "worst_ratio": min(r["ratio"] for r in rows)}


def format_deployments(timing: dict[str, Any]) -> list[str]:
    """Markdown lines: one table per batch size (every path), then the comparison line per size."""
    lines = []
    for r in timing["rows"]:
        lines += [f"Batch {r['batch_size']} ({r['samples']} samples; ms per sample, median of {timing['repeats']}):", "",
                  "| path | static | early exit | early-exit speed-up on this path |", "|---|---|---|---|"]
        for name, v in r["paths"].items():
            lines.append(f"| {name} | {v['static_ms']:.4f} | {v['early_ms']:.4f} | {v['static_ms'] / v['early_ms']:.2f}x |")
        lines += ["", f"Best static: **{r['best_static']}**; best early exit: **{r['best_early']}**: "
                      f"{r['speedup']:.2f}x over the best static for a {r['mac_speedup']:.2f}x MAC saving, "
                      f"ratio **{r['ratio']:.2f}**.", ""]
    lines.append(f"worst ratio over the best static: {timing['worst_ratio']:.2f}")
    return lines
