"""The tiers as Ray Serve replicas: :class:`TierReplica` (a tier's segments behind ``serve.batch``,
handing its survivors on to the next tier) and :class:`NoopReplica` (the same batching, no
compute: the framework's ceiling), and their deployments :data:`TierDeployment` and
:data:`NoopTier`. :mod:`.ray_app` chains them behind the HTTP ingress.

Each tier holds its segments' ONNX graphs (shipped in memory, so tiers on other machines need no
shared disk) and a handle to the next tier, which it calls only for the samples that no exit of
its own took, with their features as one binary message: one call per batch, and while as many
calls are under way as the next tier has replicas, the survivors of the batches that end
meanwhile wait and go together in the next call (fewer, fuller calls under load). A tier waits
for the next at most ``timeout_s`` per tier still ahead, then answers the carried samples itself
with its deepest exit (``degraded``). ``max_batch`` / ``batch_wait_ms`` / ``adaptive_wait``
configure its ``serve.batch`` (:class:`~eenn.serve.tiers.BatchWindow`).
"""
from __future__ import annotations

import asyncio
import time
from collections import deque

from ray import serve

from .plan import TierSpec
from .tiers import BatchWindow, Tier, merge_runnings, take_upto

__all__ = ["TierReplica", "NoopReplica", "TierDeployment", "NoopTier", "CONCURRENT_BATCHES"]

# batches' worth of requests a tier replica may hold at once: one batch computes (on the event
# loop's thread) while the requests of earlier ones wait for the next tier's answer to their survivors
CONCURRENT_BATCHES = 8


def _direct(handle):
    """``handle`` calling its deployment's replicas directly over gRPC with pickled messages,
    instead of through Ray's object store with cloudpickle: cheaper hops (on 2 cores, 32 clients,
    32-sample requests, alternating runs: the three-tier early exit 2741 and 2395 samples/s
    against 2319 and 2251); as it is where Ray Serve lacks the option. None stays None."""
    if getattr(handle, "options", None) is None:  # None, or not a Ray Serve handle
        return handle
    try:
        return handle.options(_by_reference=False, request_serialization="pickle", response_serialization="pickle")
    except TypeError:  # a Ray Serve without direct calls
        return handle


async def _within(response, timeout: float):
    """Await a deployment response, cancelling it after ``timeout`` seconds."""
    async def wait():
        return await response

    try:
        return await asyncio.wait_for(wait(), timeout)
    except asyncio.TimeoutError:
        response.cancel()
        raise TimeoutError(f"no answer within {timeout:g} s") from None


class _Item:
    """One request waiting in a tier's batch queue: its samples, what they count for against
    ``max_batch`` (a request larger than that runs alone) and when it arrived."""

    __slots__ = ("running", "size", "t0")

    def __init__(self, running, size: int, t0: float) -> None:
        self.running, self.size, self.t0 = running, size, t0


def _samples(items: list) -> int:
    return sum(i.size for i in items)


class _Batched:
    """A replica whose ``serve.batch`` method ``_run`` takes the tier's batch limits (``spec``'s
    ``max_batch`` in samples, see :func:`_samples`) and a window that follows the arrivals
    (:class:`~eenn.serve.tiers.BatchWindow`): the tier replicas and the no-op alike."""

    def _batching(self, spec: TierSpec) -> None:
        self._run.set_max_batch_size(spec.max_batch)
        self._run.set_batch_wait_timeout_s(spec.batch_wait_ms / 1000.0)
        self.window = BatchWindow(spec.batch_wait_ms / 1000.0, spec.max_batch, spec.adaptive_wait)

    def _adapt(self, items: list) -> None:
        """At the start of each batch: the window for the next one."""
        if self.window.observe([i.t0 for i in items], _samples(items)):
            self._run.set_batch_wait_timeout_s(self.window.wait_s)


class TierReplica(_Batched):
    """One replica of a tier: its segments behind ``serve.batch``, answering what exits here and
    handing the rest on to ``next_tier``. The body of :data:`TierDeployment`; the ingress holds one
    itself for a first tier that runs ``with_front``."""

    def __init__(self, manifest: dict, spec: dict, models: dict[int, bytes], next_tier, settings: dict) -> None:
        import torch

        torch.set_num_threads(1)
        self.spec = TierSpec(**spec)
        self.tier = Tier(manifest, self.spec, float16=settings["float16"], threads=settings["threads"],
                         models=models)
        self.next, self.next_name, self.timeout = _direct(next_tier), settings.get("next_name"), settings["timeout_s"]
        self._batching(self.spec)
        # survivors waiting for a hand-off to the next tier, as (reply so far, carry, future of the reply,
        # deadline of the next tier's answer); at most ``in_flight`` hand-off tasks (``_senders``) empty it
        self._outbox: deque = deque()
        self._senders, self._hops = 0, set()  # hand-off tasks running, and the tasks themselves
        self.in_flight = max(1, int(settings.get("next_replicas", 1)))
        self.next_max_batch = int(settings.get("next_max_batch") or self.spec.max_batch)

    async def __call__(self, message: bytes) -> dict:
        running = self.tier.read(message)
        reply = await self._run(_Item(running, min(len(running), self.spec.max_batch), time.perf_counter()))
        if isinstance(reply, asyncio.Future):  # some samples went on: the reply comes with the next tier's
            reply = await reply
        return reply

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0, batch_size_fn=_samples,
                 max_concurrent_batches=CONCURRENT_BATCHES)
    async def _run(self, items: list) -> list:
        """The requests gathered by ``serve.batch`` through this tier's segments at once. A
        request whose samples all exited here gets its reply now; the others get a future of their
        reply, and their survivors join the outbox, which :meth:`_send` empties to the next tier
        (:meth:`_hop`). The batch ends without waiting for the next tier, as the in-process
        queue's does: its early answers do not wait on the hop, nor its slot in ``serve.batch``
        (``max_concurrent_batches``)."""
        self._adapt(items)
        now = time.perf_counter()
        results = self.tier.run_many([i.running for i in items], [now - i.t0 for i in items])
        replies: list = [r for r, _ in results]
        if all(c is None for _, c in results):
            return replies
        loop, due = asyncio.get_running_loop(), time.perf_counter() + self.timeout
        for j, (reply, carry) in enumerate(results):
            if carry is not None:
                replies[j] = loop.create_future()
                self._outbox.append((reply, carry, replies[j], due))
        if self._senders < self.in_flight:
            self._senders += 1  # counted now: another batch may end before the task starts
            task = loop.create_task(self._send())
            self._hops.add(task)  # held until done (the loop keeps only a weak reference)
            task.add_done_callback(self._hops.discard)
        return replies

    async def _send(self) -> None:
        """Hand the outbox's survivors to the next tier, at most ``next_max_batch`` samples a call,
        until it is empty. At most ``in_flight`` of these run at once (the next tier's replica
        count): survivors of the batches that end while the hops are under way wait and go
        together in the next call. A Ray Serve call costs a few milliseconds of the cores in
        the caller and the callee whatever it carries, so under load this makes fewer, fuller
        calls; at light load the outbox holds one batch's survivors and they go at once."""
        try:
            while self._outbox:
                await self._hop(take_upto(self._outbox, self.next_max_batch, lambda item: len(item[1])))
        except BaseException as e:  # cancelled (the replica stops): no request may be left waiting
            for _, _, fut, _ in self._outbox:
                if not fut.done():
                    fut.set_exception(e)
            self._outbox.clear()
            raise
        finally:
            self._senders -= 1

    async def _hop(self, group: list) -> None:
        """Send ``group``'s survivors (``(reply, carry, future, deadline)`` of several requests)
        on as one message and fold the next tier's reply into each request's reply (a dead
        replica, an error downstream or no answer by the earliest deadline, the time in the outbox
        included: each is answered with this tier's deepest exit, flagged); then complete their
        futures."""
        try:
            merged, offsets = merge_runnings([c for _, c, _, _ in group])
            out, enc = self.tier.handoff(merged)
            t0 = time.perf_counter()
            try:
                left = min(d for *_, d in group) - t0
                if left <= 0:
                    raise TimeoutError(f"no answer within {self.timeout:g} s (waited for earlier hand-offs)")
                down = await _within(self.next.remote(out), left)
            except Exception as e:  # noqa: BLE001 - answer with what we have
                for reply, carry, _, _ in group:
                    self.tier.fail(reply, carry, self.next_name, e)
            else:
                self.tier.join_merged([(reply, carry) for reply, carry, _, _ in group], offsets, down,
                                      time.perf_counter() - t0, enc, len(out))
        except BaseException as e:  # noqa: BLE001 - no request may be left waiting
            for _, _, fut, _ in group:
                if not fut.done():
                    fut.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        for reply, _, fut, _ in group:
            if not fut.done():  # (a request cancelled meanwhile has no one to answer)
                fut.set_result(reply)


TierDeployment = serve.deployment(max_ongoing_requests=64, health_check_period_s=2, health_check_timeout_s=10,
                                  graceful_shutdown_timeout_s=2, graceful_shutdown_wait_loop_s=0.5)(TierReplica)


class NoopReplica(_Batched):
    """A tier that computes nothing: it reads the message, waits in the same ``serve.batch`` as a
    tier would (the first tier's ``max_batch`` and ``batch_wait_ms``) and answers every sample
    with class 0 at exit 0. Behind the same ingress (or inside it, where the plan's first tier
    runs ``with_front``), it measures what the framework itself costs (HTTP, input decoding, the
    Ray call to the tier when there is one, batching, the JSON answer): the ceiling a served model
    can approach (``build_app(plan, noop=True)``)."""

    def __init__(self, spec: dict, num_classes: int) -> None:
        self.spec = TierSpec(**spec)
        self.probs = [1.0 / num_classes] * num_classes
        self._batching(self.spec)

    async def __call__(self, message: bytes) -> dict:
        from .codec import decode

        _, meta = decode(message)
        n = int(meta["batch"])
        return await self._run(_Item(n, min(n, self.spec.max_batch), time.perf_counter()))

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0, batch_size_fn=_samples)
    async def _run(self, items: list) -> list:
        self._adapt(items)
        now, total = time.perf_counter(), sum(i.running for i in items)
        return [{"answers": {"index": list(range(i.running)), "prediction": [0] * i.running, "exit": [0] * i.running,
                             "depth": [0] * i.running, "probs": [self.probs] * i.running,
                             "degraded": [False] * i.running, "tier": [self.spec.name] * i.running},
                 "tiers": [{"name": self.spec.name, "s": 0.0, "samples": i.running, "batch": total,
                            "wait_s": now - i.t0}], "hops": [], "errors": []} for i in items]


NoopTier = serve.deployment(max_ongoing_requests=64, graceful_shutdown_timeout_s=2,
                            graceful_shutdown_wait_loop_s=0.5)(NoopReplica)
