"""Making the clock follow the MACs: inference-only rewrites of a trained network's segments,
and a CPU memory setting. Both apply to the dynamic engine and to the static baseline alike.

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
"""
from __future__ import annotations

import ctypes
import ctypes.util
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from .network import MultiExitNetwork

__all__ = ["OptimizedSegments", "tune_cpu_allocator"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_allocator_tuned: bool | None = None


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

class _Flat(nn.Module):
    """``fn(*state, [prev])`` with tensors only in and out (what tracing needs): the state
    (a tensor or a tuple of tensors), then the logits, then the gate when there is one."""

    def __init__(self, owner: nn.Module, fn: Callable, n_state: int | None, with_prev: bool) -> None:
        super().__init__()
        self.owner, self.fn, self.n_state, self.with_prev = owner, fn, n_state, with_prev

    def forward(self, *args: Tensor):
        n = 1 if self.n_state is None else self.n_state
        state = args[0] if self.n_state is None else tuple(args[:n])
        out = self.fn(state, args[n]) if self.with_prev else self.fn(state)
        return _flatten(out)


def _flatten(out) -> tuple[Tensor, ...]:
    if isinstance(out, Tensor):
        return (out,)
    flat: list[Tensor] = []
    for o in out:
        if isinstance(o, tuple):
            flat.extend(o)
        elif o is not None:
            flat.append(o)
    return tuple(flat)


def _close(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point():
            scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
            if not torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-4 * scale):
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
    on first use, for the device, dtype and state layout they are first called with.

    Each traced piece is checked against the eager module on its first inputs and on the same
    inputs at another batch size; a piece that cannot be traced, or whose outputs differ by more
    than float rounding (rtol 1e-3), stays eager, with a warning. Outputs agree with the eager
    network to float rounding (BatchNorm is folded into the convolutions), so a score within
    ~1e-6 of its threshold can decide the other way.

    (Choosing eager or traced per piece and batch size by timing them was tried: timed alone,
    a piece does not cost what it costs between the others, and mixing the two was slower than
    either at batch 1; traced was as fast as eager at batch 1 and faster above.)"""

    def __init__(self, net: MultiExitNetwork) -> None:
        if net.training:
            raise RuntimeError("put the network in eval mode before optimising it for inference")
        self.net = net
        self._traced_fn: dict[tuple, Callable | None] = {}  # None: this piece runs eagerly
        self._layout: dict[tuple, tuple[int | None, bool]] = {}
        self.fallbacks: list[str] = []  # what stayed eager, and why

    def _trace(self, key: tuple, label: str, module: _Flat, args: tuple[Tensor, ...]) -> Callable | None:
        fn: Callable | None = None
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings: the checks below decide
                traced = torch.jit.trace(module.eval(), args, check_trace=False)
                fn = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
                other = _other_size(args)
                if not (_close(fn(*args), module(*args)) and _close(fn(*other), module(*other))):
                    raise ValueError("its outputs differ from the eager module's")
        except Exception as e:  # noqa: BLE001 - any failure means: run this piece eagerly
            fn = None
            reason = f"{label} stays eager ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            self.fallbacks.append(reason)
            warnings.warn(reason, RuntimeWarning, stacklevel=4)
        return fn

    def _pick(self, key: tuple, label: str, module: Callable[[], _Flat], args: tuple[Tensor, ...]) -> Callable | None:
        """The traced piece for ``args``, or None to run eagerly."""
        if key not in self._traced_fn:
            self._traced_fn[key] = self._trace(key, label, module(), args)
        return self._traced_fn[key]

    def traced(self) -> dict[str, bool]:
        """``{"segment 0": True, "backbone": False, ...}``: which pieces run traced so far."""
        return {("backbone" if k[0] == "backbone" else f"segment {k[1]}"): fn is not None
                for k, fn in self._traced_fn.items()}

    @staticmethod
    def _key(*args: Tensor) -> tuple:
        return tuple((a.device, a.dtype, a.dim()) for a in args)

    def forward_segment(self, k: int, state, prev: Tensor | None = None):
        """As :meth:`MultiExitNetwork.forward_segment`."""
        net = self.net
        n_state = len(state) if isinstance(state, tuple) else None
        args = (*state,) if n_state is not None else (state,)
        if prev is not None:
            args = args + (prev,)
        key = ("segment", k, n_state, prev is not None) + self._key(*args)
        if key not in self._layout:
            with torch.no_grad():
                out = net.forward_segment(k, state, prev)  # the output's layout, to unflatten
            self._layout[key] = (len(out[0]) if isinstance(out[0], tuple) else None, out[2] is not None)

        def module() -> _Flat:
            seg = (lambda s, p: net.forward_segment(k, s, p)) if prev is not None else (lambda s: net.forward_segment(k, s))
            return _Flat(net, seg, n_state, prev is not None)

        fn = self._pick(key, f"segment {k}", module, args)
        if fn is None:
            return net.forward_segment(k, state, prev)
        out = fn(*args)
        n_out, has_gate = self._layout[key]
        n = 1 if n_out is None else n_out
        return (out[0] if n_out is None else tuple(out[:n])), out[n], (out[n + 1] if has_gate else None)

    def backbone(self, x: Tensor) -> Tensor:
        """The static backbone's logits, optimised (and timed) the same way: the fair baseline."""
        bb = self.net.backbone
        fn = self._pick(("backbone",) + self._key(x), "the static backbone",
                        lambda: _Flat(bb, lambda s: bb(s), None, False), (x,))
        return bb(x) if fn is None else fn(x)[0]
