"""Multi-process training under ``torchrun``: process-group set-up, metric reduction, and the
rules that keep every rank's copy of the network identical where it matters.

``torchrun --nproc_per_node=N`` sets RANK, WORLD_SIZE and LOCAL_RANK; with WORLD_SIZE > 1 the
trainer joins the group (NCCL on CUDA, gloo on CPU), wraps the model in
DistributedDataParallel, shards the data, sums metrics over ranks and writes from rank 0 only.

Every collective the trainer makes runs inside :func:`collective`, and the group is created with
a timeout: a rank that waits longer than that on the others (one of them died, hangs or runs a
different number of steps) stops with a :class:`DistributedTimeout` that names its rank and what
it was waiting on, instead of holding the job for ever.
"""
from __future__ import annotations

import collections
import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "DistributedTimeout", "setup", "teardown", "collective", "all_reduce_sum", "barrier",
           "broadcast_flag", "sync_buffers", "all_gather_objects"]

DEFAULT_TIMEOUT = 600.0  # seconds a rank waits on the others before it gives up


class DistributedTimeout(RuntimeError):
    """A rank waited on the others for longer than the process group's timeout (or lost them)."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # whether we initialised the process group (and must tear it down)
    timeout: float = DEFAULT_TIMEOUT

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_type: str, timeout: float = DEFAULT_TIMEOUT) -> DistEnv:
    """Join the torchrun process group if there is one (a single process otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(timeout=timeout)
    if timeout <= 0:
        raise ValueError(f"dist_timeout must be > 0 seconds, got {timeout}")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))
        owns = True
    return DistEnv(rank, world, local, owns, timeout)


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# Words with which gloo and NCCL report a peer that never answered or went away.
_LOST = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "connection refused",
         "peer", "watchdog")


@contextlib.contextmanager
def collective(what: str | Callable[[], str], env: DistEnv) -> Iterator[None]:
    """Run a block of collectives; a timeout or a lost peer in it becomes a
    :class:`DistributedTimeout` saying which rank waited on what (``what`` may be a function,
    called only then, so a loop can name its current step without formatting it every time)."""
    if not env.enabled:
        yield
        return
    try:
        yield
    except DistributedTimeout:
        raise
    except RuntimeError as e:  # DistBackendError and gloo's errors are RuntimeErrors
        text = str(e)
        if not any(w in text.lower() for w in _LOST):
            raise
        first = text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__
        what = what() if callable(what) else what
        raise DistributedTimeout(
            f"rank {env.rank} of {env.world_size} gave up waiting on the other ranks during {what} "
            f"(timeout {env.timeout:g} s): another rank has died, hangs, or runs a different number of steps; "
            f"look at the other ranks' output for the first error. Backend said: {first}") from e


# The handles of the latest collectives, kept alive here on purpose. With gloo, the worker thread
# that ran a collective drops its reference to it just after the caller's wait() returns; if
# that is the last reference, the work and its tensors are destroyed on that thread, which needs
# the GIL. At interpreter shutdown that thread cannot have it and the process aborts ("terminate
# called without an active exception", seen about once in 25 three-process runs on 2 loaded
# cores; DDP keeps the process group, and so its worker threads, alive until exit). Holding the
# last handles here makes the main thread, not a worker, the one that frees them.
_RECENT: collections.deque = collections.deque(maxlen=32)


def _wait(work) -> None:
    work.wait()
    _RECENT.append(work)


def all_reduce_sum(t: torch.Tensor, env: DistEnv, what: str = "a metric reduction") -> torch.Tensor:
    """Sum ``t`` over ranks (in place; a no-op for one process)."""
    if env.enabled:
        with collective(what, env):
            _wait(dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True))
    return t


def barrier(env: DistEnv, what: str = "the barrier at the end of training") -> None:
    if env.enabled:
        with collective(what, env):
            _wait(dist.barrier(async_op=True))


def broadcast_flag(flag: bool, env: DistEnv, device: torch.device, what: str = "rank 0's stop decision") -> bool:
    """Rank 0's decision (e.g. early stopping) for every rank."""
    if not env.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    with collective(what, env):
        _wait(dist.broadcast(t, src=0, async_op=True))
    return bool(t.item())


def all_gather_objects(obj: Any, env: DistEnv, what: str = "gathering per-rank state") -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process). Objects travel between the
    job's own processes only; nothing read from a file is unpickled."""
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    with collective(what, env):
        dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def sync_buffers(buffers: Iterable[torch.Tensor], env: DistEnv, what: str = "the buffer synchronisation") -> None:
    """Make every rank's buffers bit-identical. The rule: floating-point buffers (BatchNorm's
    running mean and variance) become their average over ranks -- under DDP each rank has updated
    rank 0's statistics with its own last batch, so the average takes every rank's data into
    account -- and everything else (``num_batches_tracked``, integer state) becomes rank 0's.
    Rank 0's result is then broadcast, so equality does not rest on the backend's summation order."""
    if not env.enabled:
        return
    bufs = list(buffers)
    floats = [b for b in bufs if b.is_floating_point()]
    with collective(what, env):
        if floats:
            flat = _flatten(floats, torch.float64)
            _wait(dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True))
            _unflatten(flat.div_(env.world_size), floats)
        for dtype in dict.fromkeys(b.dtype for b in bufs):  # one broadcast per dtype, in the same order on every rank
            group = [b for b in bufs if b.dtype == dtype]
            flat = _flatten(group, dtype)
            _wait(dist.broadcast(flat, src=0, async_op=True))
            _unflatten(flat, group)


def _flatten(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def _unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    i = 0
    for t in tensors:
        t.copy_(flat[i:i + t.numel()].view_as(t))
        i += t.numel()
