"""Making the clock follow the MACs: inference-only rewrites of a trained network's segments,
a CPU memory setting, and a way to keep PyTorch's thread pool out of another runtime's way. The
first two apply to the dynamic engine and to the static baseline alike.

Why. On a CPU at large batches, the high-resolution early stages cost more time than their MACs
say: every convolution reorders its NCHW input into oneDNN's blocked layout and back, and
BatchNorm, ReLU and the residual add each make one more pass over the largest tensors. A
segment traced, frozen and optimised for inference (:func:`torch.jit.optimize_for_inference`)
keeps the blocked layout between convolutions, folds BatchNorm into them and fuses ReLU and
adds; on ResNet-20 / Fashion-MNIST at batch 256 the first segment then takes ~35% of the static
time for its 36% of the MACs instead of ~44% (``benchmarks/engine_speed.py`` prints both).

And glibc hands large freed blocks back to the kernel (above its ``mmap``/trim thresholds), so a
layer's multi-megabyte output is faulted in page by page at every call:
:func:`tune_cpu_allocator` keeps such blocks in the process instead.

When the network runs in another runtime (onnxruntime), the PyTorch code between its calls
(the exit loop's scores, decisions and copies) is small, but PyTorch hands even a softmax over
256 rows to its OpenMP threads, which then spin for milliseconds waiting for more work and take
the cores from the runtime's next call. :func:`serial_torch` runs such code on the calling
thread alone.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import warnings
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .network import MultiExitNetwork

__all__ = ["OptimizedSegments", "tune_cpu_allocator", "serial_torch"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_allocator_tuned: bool | None = None
_openmp_lib: ctypes.CDLL | bool | None = None


def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime PyTorch's CPU ops run on (Linux: found among the loaded libraries),
    or None (another parallel backend, another system)."""
    global _openmp_lib
    if _openmp_lib is None:
        _openmp_lib = False
        if sys.platform.startswith("linux") and "parallel backend: OpenMP" in torch.__config__.parallel_info():
            with contextlib.suppress(OSError):
                with open("/proc/self/maps") as f:
                    paths = {line.split()[-1] for line in f if "omp" in line.rsplit("/", 1)[-1]}
                torch_dir = os.path.dirname(torch.__file__)
                # PyTorch's own copy first (a wheel bundles one; another library may load a second)
                for path in sorted(paths, key=lambda q: (not q.startswith(torch_dir), q)):
                    name = path.rsplit("/", 1)[-1]
                    if name.startswith(("libgomp", "libiomp", "libomp")):
                        lib = ctypes.CDLL(path)
                        if hasattr(lib, "omp_set_num_threads") and hasattr(lib, "omp_get_max_threads"):
                            _openmp_lib = lib
                            break
    return _openmp_lib or None


@contextlib.contextmanager
def serial_torch() -> Iterator[None]:
    """PyTorch's CPU ops on the calling thread run on that thread alone inside the block, not
    in PyTorch's thread pool; other threads and the process-wide setting
    (:func:`torch.get_num_threads` elsewhere) are untouched. For the small PyTorch code around
    calls into another runtime: on 2 cores, one softmax over ``[256, 10]`` between two
    2-thread onnxruntime calls of a ResNet-20 segment costs 2.6 ms, the time OpenMP's woken
    thread spins before it sleeps (``torch.set_num_threads(1)`` would change the count for every
    thread started later, and for oneDNN's caches). Sets this thread's OpenMP thread count (an
    OpenMP setting kept per thread); does nothing where PyTorch does not run on OpenMP."""
    lib = _openmp()
    if lib is None:
        yield
        return
    torch.get_num_threads()  # PyTorch sets a thread's OpenMP count on its first parallel op: do it now
    before = lib.omp_get_max_threads()
    lib.omp_set_num_threads(1)
    try:
        yield
    finally:
        lib.omp_set_num_threads(before)


def tune_cpu_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Keep freed blocks of up to ``mmap_threshold`` bytes (glibc's maximum, 32 MiB) in the
    process, and give free memory back to the kernel only when more than ``trim_threshold``
    is idle, so that tensors of a few MiB are not page-faulted in again at every layer.

    Process-wide and lasting (glibc ``mallopt``); the cost is that memory once used by the
    largest activations stays with the process. Returns whether it applied (False on systems
    without glibc). The ``eenn`` command calls it; call it yourself from Python."""
    global _allocator_tuned
    if _allocator_tuned is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            mallopt = getattr(libc, "mallopt", None)
            gnu = getattr(libc, "gnu_get_libc_version", None)
        except OSError:
            mallopt = gnu = None
        if mallopt is None or gnu is None:  # not glibc: nothing to do
            _allocator_tuned = False
        else:
            ok = mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(int(mmap_threshold)))
            ok &= mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(int(trim_threshold)))
            _allocator_tuned = bool(ok)
    return _allocator_tuned


# --- traced segments ----------------------------------------------------------------------------
# Tracing needs tensors in and tensors out: inputs and outputs (nested tuples and named tuples
# of tensors, None, strings) are flattened to their tensors plus a hashable spec to rebuild them.

def _flatten(obj, leaves: list[Tensor]):
    if isinstance(obj, Tensor):
        leaves.append(obj)
        return "T"
    if isinstance(obj, tuple):
        return (type(obj) if hasattr(obj, "_fields") else tuple, tuple(_flatten(o, leaves) for o in obj))
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return ("const", obj)
    raise TypeError(f"cannot pass a {type(obj).__name__} through a traced segment")


def _unflatten(spec, leaves):
    if spec == "T":
        return next(leaves)
    kind, rest = spec
    if kind == "const":
        return rest
    items = [_unflatten(s, leaves) for s in rest]
    return kind(*items) if kind is not tuple else tuple(items)


class _Flat(nn.Module):
    """``fn(*inputs)`` with tensors only in and out: ``forward(*leaves)`` rebuilds the inputs
    from ``spec_in``, calls ``fn`` and returns the output's tensors (layout in ``spec_out``)."""

    def __init__(self, owner: nn.Module, fn: Callable, spec_in) -> None:
        super().__init__()
        self.owner, self.fn, self.spec_in = owner, fn, spec_in  # owner: its parameters are traced
        self.spec_out = None

    def forward(self, *leaves: Tensor) -> tuple[Tensor, ...]:
        out = self.fn(*_unflatten(self.spec_in, iter(leaves)))
        flat: list[Tensor] = []
        self.spec_out = _flatten(out, flat)
        return tuple(flat)


def _close(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point():
            scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
            if not torch.allclose(x.double(), y.double(), rtol=1e-3, atol=1e-4 * scale):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def _other_size(args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The same inputs at another batch size (to catch a batch size the trace baked in)."""
    if args[0].shape[0] > 1:
        return tuple(a[:1] for a in args)
    return tuple(torch.cat([a, a]) for a in args)


class OptimizedSegments:
    """``net``'s segments (and its static backbone) traced, frozen and optimised for inference
    on first use, for the device, dtype and input structure they are first called with.

    Each traced piece is checked against the eager code on its first inputs and on the same
    inputs at another batch size; a piece that cannot be traced, or whose outputs differ by more
    than float rounding (rtol 1e-3), stays eager, with a warning. Outputs agree with the eager
    network to float rounding (BatchNorm is folded into the convolutions), so a score within
    ~1e-6 of its threshold can decide the other way.

    Batches smaller than ``min_batch`` run eagerly: at batch 1 on a CPU the layout changes at
    a traced segment's two ends cost what fusing saves (with ``min_batch=1`` the engine ran a
    little slower than eager at batch 1 on ResNet-20 / Fashion-MNIST, in three runs).
    (Choosing per piece and batch size by timing both on first use was tried: timed alone, a
    piece does not cost what it costs between the others, and the mix was slower than either.)"""

    def __init__(self, net: MultiExitNetwork, *, min_batch: int = 2) -> None:
        if net.training:
            raise RuntimeError("put the network in eval mode before optimising it for inference")
        if min_batch < 1:
            raise ValueError(f"min_batch must be at least 1, got {min_batch}")
        self.net = net
        self.min_batch = min_batch
        self._pieces: dict[tuple, tuple[Callable | None, object]] = {}  # key -> (traced or None, spec_out)
        self.fallbacks: list[str] = []  # what stayed eager, and why

    def _trace(self, label: str, module: _Flat, leaves: tuple[Tensor, ...]) -> Callable | None:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings: the checks below decide
                traced = torch.jit.trace(module.eval(), leaves, check_trace=False)
                fn = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
                other = _other_size(leaves)
                if not (_close(fn(*leaves), module(*leaves)) and _close(fn(*other), module(*other))):
                    raise ValueError("its outputs differ from the eager code's")
            return fn
        except Exception as e:  # noqa: BLE001 - any failure means: run this piece eagerly
            reason = f"{label} stays eager ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            self.fallbacks.append(reason)
            warnings.warn(reason, RuntimeWarning, stacklevel=4)
            return None

    def run(self, label: str, fn: Callable, *inputs):
        """``fn(*inputs)``, traced on first use for this ``label`` and input structure (``fn`` must
        then stand for the same computation at every call with that label)."""
        leaves: list[Tensor] = []
        spec_in = _flatten(inputs, leaves)
        t = leaves[0]
        key = (label, spec_in, t.device, t.dtype)
        piece = self._pieces.get(key)
        if piece is None:
            if any(x.device != t.device for x in leaves):
                return fn(*inputs)  # inputs on several devices: not traced
            module = _Flat(self.net, fn, spec_in)
            with torch.no_grad():
                module(*leaves)  # the output's layout
            piece = self._pieces[key] = (self._trace(label, module, tuple(leaves)), module.spec_out)
        traced, spec_out = piece
        if traced is None:
            return fn(*inputs)
        out = traced(*leaves)
        return out[0] if spec_out == "T" else _unflatten(spec_out, iter(out))

    def forward_segment(self, k: int, state, prev: Tensor | None = None):
        """As :meth:`MultiExitNetwork.forward_segment`."""
        net = self.net
        if (state[0] if isinstance(state, tuple) else state).shape[0] < self.min_batch:
            return net.forward_segment(k, state, prev)
        return self.run(f"segment {k}", lambda s, p: net.forward_segment(k, s, p), state, prev)

    def backbone(self, x: Tensor) -> Tensor:
        """The static backbone's logits, optimised the same way: the fair baseline."""
        bb = self.net.backbone
        if x.shape[0] < self.min_batch:
            return bb(x)
        return self.run("the static backbone", bb, x)

    def traced(self) -> dict[str, bool]:
        """``{"segment 0": True, "the static backbone": False, ...}``: which pieces run traced."""
        return {key[0]: fn is not None for key, (fn, _) in self._pieces.items()}
