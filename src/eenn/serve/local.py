"""The in-process chain of tiers: every tier of a plan in this process, each behind a queue that
batches concurrent requests as a Ray tier's ``serve.batch`` does (the default for tests and small
use; ``eenn serve --local``)."""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

from ..policies.loop import Running
from ..staged import load_manifest, read_segments
from .plan import TierPlan
from .tiers import BatchWindow, Tier, merge_runnings, take_upto

__all__ = ["LocalPipeline"]


class _Batcher:
    """One tier's queue in the in-process mode, as a Ray tier's ``serve.batch`` is on Ray:
    ``workers`` threads (the plan's ``replicas``: on Ray, each a process) take the requests in
    arrival order, up to ``max_batch`` samples (a larger request alone; ``max_batch`` 1: one
    request a run), waiting at most ``wait_s`` after the first for others (a window that follows
    how the requests arrive, unless ``adaptive`` is false: :class:`BatchWindow`), and run them
    together (:meth:`Tier.run_many`; onnxruntime runs concurrent calls, on the calling threads). Then the
    survivors of the whole run go on to the next tier as one message, and the next tier's reply
    is split back per request (:meth:`_onward`), without the worker waiting for it.
    :meth:`submit` returns a future of the request's complete reply. ``sizes`` records the
    samples of every run."""

    def __init__(self, tier: Tier, max_batch: int, wait_s: float, workers: int = 1, adaptive: bool = True) -> None:
        self.tier, self.max_batch = tier, int(max_batch)
        self.window = BatchWindow(wait_s, self.max_batch, adaptive)
        self.next: _Batcher | None = None  # the next tier's queue (set by LocalPipeline)
        self.sizes: deque[int] = deque(maxlen=4096)  # samples per run, the latest last
        self._cv = threading.Condition()
        self._queue: deque[tuple[Running, Future, float]] = deque()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"eenn-tier-{tier.name}-{i}")
                         for i in range(max(1, int(workers)))]
        for t in self._threads:
            t.start()

    def submit(self, message: bytes) -> Future:
        """Queue a hand-off message (decoded in the caller's thread): a future of the reply of
        this tier and every tier after it."""
        running = self.tier.read(message)
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError(f"tier {self.tier.name!r} is closed")
            self._queue.append((running, fut, time.perf_counter()))
            self._cv.notify_all()
        return fut

    def _take(self) -> list[tuple[Running, Future, float]] | None:
        """The next batch (None once closed and empty): called holding the lock."""
        while True:
            self._cv.wait_for(lambda: self._queue or self._closed)
            if not self._queue:
                return None
            deadline = self._queue[0][2] + self.window.wait_s
            while not self._closed and sum(len(q[0]) for q in self._queue) < self.max_batch:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)  # a new arrival or the end of the batching window
            if self._queue:  # else another worker took them while this one waited
                break
        batch = take_upto(self._queue, self.max_batch, lambda item: len(item[0]))
        self.window.observe([b[2] for b in batch], sum(len(b[0]) for b in batch))
        return batch

    def _work(self) -> None:
        while True:
            with self._cv:
                batch = self._take()
            if batch is None:
                return
            now = time.perf_counter()
            try:
                results = self.tier.run_many([b[0] for b in batch], [now - b[2] for b in batch])
            except BaseException as e:  # noqa: BLE001 - every request of the batch gets the error
                for b in batch:
                    b[1].set_exception(e)
                continue
            self.sizes.append(sum(len(b[0]) for b in batch))
            try:
                self._onward([(reply, carry, b[1]) for b, (reply, carry) in zip(batch, results)])
            except BaseException as e:  # noqa: BLE001 - no request may be left waiting
                for b in batch:
                    if not b[1].done():
                        b[1].set_exception(e)

    def _onward(self, items: list[tuple[dict[str, Any], Running | None, Future]]) -> None:
        """Answer the requests whose samples all exited here; hand the survivors of the others on
        as one message and, when the next tier's reply comes, fold each request's part of it in
        (or, if the next tier failed, answer them with this tier's deepest exit, flagged)."""
        carried = [(reply, carry, fut) for reply, carry, fut in items if carry is not None]
        for reply, carry, fut in items:
            if carry is None:
                fut.set_result(reply)
        if not carried:
            return
        tier, nxt = self.tier, self.next
        merged, offsets = merge_runnings([c for _, c, _ in carried])
        out, enc = tier.handoff(merged)
        t0 = time.perf_counter()

        def joined(down: Future) -> None:
            rt, error = time.perf_counter() - t0, down.exception()
            try:
                if error is not None:  # a failing tier (tests inject one) degrades, as on Ray
                    for reply, carry, _ in carried:
                        tier.fail(reply, carry, nxt.tier.name, error)
                else:
                    tier.join_merged([(reply, carry) for reply, carry, _ in carried], offsets, down.result(), rt, enc,
                                     len(out))
            except BaseException as e:  # noqa: BLE001 - no request may be left waiting
                for _, _, fut in carried:
                    fut.set_exception(e)
                return
            for reply, _, fut in carried:
                fut.set_result(reply)

        try:
            down = nxt.submit(out)
        except Exception as e:  # noqa: BLE001 - the next tier refused the message (closed, unreadable)
            down = Future()
            down.set_exception(e)
        down.add_done_callback(joined)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=10)


class LocalPipeline:
    """Every tier of a plan in this process, chained by queues (the default for tests and small
    use): ``LocalPipeline(plan)(message) -> reply`` as the Ray chain answers. Calls may come from
    many threads at once: each tier batches them as its ``max_batch`` and ``batch_wait_ms`` say
    (:class:`_Batcher`) and hands a run's survivors on as one message, which the next tier
    batches again with whatever else arrives there. :meth:`quiesced` holds new requests back and
    waits for those in flight (to change the policy of every tier between requests)."""

    def __init__(self, plan: TierPlan, manifest: dict[str, Any] | None = None) -> None:
        self.plan = plan
        self.manifest = manifest or load_manifest(plan.model)
        self.tiers = [Tier(self.manifest, s, float16=plan.float16, threads=s.threads(plan.threads),
                           models=read_segments(self.manifest, (s.start, s.stop))) for s in plan.tiers]
        self.batchers = [_Batcher(t, s.max_batch, s.batch_wait_ms / 1000.0, workers=s.replicas, adaptive=s.adaptive_wait)
                         for t, s in zip(self.tiers, plan.tiers)]
        for a, b in zip(self.batchers, self.batchers[1:]):
            a.next = b
        self._cv = threading.Condition()
        self._in_flight, self._held = 0, False

    def __call__(self, message: bytes) -> dict[str, Any]:
        with self._cv:
            self._cv.wait_for(lambda: not self._held)
            self._in_flight += 1
        try:
            return self.batchers[0].submit(message).result()
        finally:
            with self._cv:
                self._in_flight -= 1
                self._cv.notify_all()

    def quiesced(self):
        """A context: no request in flight inside it (new ones wait until it ends)."""
        from contextlib import contextmanager

        @contextmanager
        def held():
            with self._cv:
                self._cv.wait_for(lambda: not self._held)
                self._held = True
                self._cv.notify_all()
                self._cv.wait_for(lambda: self._in_flight == 0)
            try:
                yield
            finally:
                with self._cv:
                    self._held = False
                    self._cv.notify_all()

        return held()

    def close(self) -> None:
        for b in self.batchers:
            b.close()
