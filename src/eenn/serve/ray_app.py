"""The tiers as Ray Serve deployments: ingress (HTTP) -> tier 1 -> tier 2 -> ... .

Each tier is a deployment holding its segments' ONNX graphs (shipped in memory, so tiers on other
machines need no shared disk) and a handle to the next tier, which it calls only for the samples
that no exit of its own took, with their features as one binary message: one call per batch, and
while as many calls are under way as the next tier has replicas, the survivors of the batches that
end meanwhile wait and go together in the next call (fewer, fuller calls under load). A tier waits for the
next at most ``timeout_s`` per tier still ahead, then answers the carried samples itself with its
deepest exit (``degraded``); Ray Serve restarts a dead replica on its own, and answers are whole
again once it is back. Per tier, the plan's ``replicas`` and ``ray_actor_options`` (which can pin
tiers to machines with custom resources) configure the deployment, and ``max_batch`` /
``batch_wait_ms`` its ``serve.batch``: concurrent requests' samples run through the tier's
segments together (:meth:`eenn.serve.tiers.Tier.run_many`, as in the in-process mode). A plan's
``monitor:`` runs in the ingress replica, whose requests carry the thresholds it serves to every
tier (:class:`Ingress`).
"""
from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from dataclasses import asdict, replace
from pathlib import Path

import ray
from ray import serve
from starlette.requests import Request

from ..staged import load_manifest, read_segments
from .app import Front
from .plan import TierPlan, TierSpec
from .ray_env import INGRESSES, check_port_free, free_port, haproxy_available, ingress_env
from .tiers import BatchWindow, Tier, merge_runnings, take_upto

__all__ = ["TierDeployment", "NoopTier", "Ingress", "build_app", "start", "serve_plan", "free_port", "APP_NAME",
           "haproxy_available"]

APP_NAME = "eenn"
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


class TierReplica:
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
        self._run.set_max_batch_size(self.spec.max_batch)  # samples (see _samples)
        self._run.set_batch_wait_timeout_s(self.spec.batch_wait_ms / 1000.0)
        self.window = BatchWindow(self.spec.batch_wait_ms / 1000.0, self.spec.max_batch, self.spec.adaptive_wait)
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
        if self.window.observe([i.t0 for i in items], _samples(items)):
            self._run.set_batch_wait_timeout_s(self.window.wait_s)
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


class NoopReplica:
    """A tier that computes nothing: it reads the message, waits in the same ``serve.batch`` as a
    tier would (the first tier's ``max_batch`` and ``batch_wait_ms``) and answers every sample
    with class 0 at exit 0. Behind the same ingress (or inside it, where the plan's first tier
    runs ``with_front``), it measures what the framework itself costs (HTTP, input decoding, the
    Ray call to the tier when there is one, batching, the JSON answer): the ceiling a served model
    can approach (``build_app(plan, noop=True)``)."""

    def __init__(self, spec: dict, num_classes: int) -> None:
        self.spec = TierSpec(**spec)
        self.probs = [1.0 / num_classes] * num_classes
        self._run.set_max_batch_size(self.spec.max_batch)
        self._run.set_batch_wait_timeout_s(self.spec.batch_wait_ms / 1000.0)
        self.window = BatchWindow(self.spec.batch_wait_ms / 1000.0, self.spec.max_batch, self.spec.adaptive_wait)

    async def __call__(self, message: bytes) -> dict:
        from .codec import decode

        _, meta = decode(message)
        n = int(meta["batch"])
        return await self._run(_Item(n, min(n, self.spec.max_batch), time.perf_counter()))

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0, batch_size_fn=_samples)
    async def _run(self, items: list) -> list:
        if self.window.observe([i.t0 for i in items], _samples(items)):
            self._run.set_batch_wait_timeout_s(self.window.wait_s)
        now, total = time.perf_counter(), sum(i.running for i in items)
        return [{"answers": {"index": list(range(i.running)), "prediction": [0] * i.running, "exit": [0] * i.running,
                             "depth": [0] * i.running, "probs": [self.probs] * i.running,
                             "degraded": [False] * i.running, "tier": [self.spec.name] * i.running},
                 "tiers": [{"name": self.spec.name, "s": 0.0, "samples": i.running, "batch": total,
                            "wait_s": now - i.t0}], "hops": [], "errors": []} for i in items]


NoopTier = serve.deployment(max_ongoing_requests=64, graceful_shutdown_timeout_s=2,
                            graceful_shutdown_wait_loop_s=0.5)(NoopReplica)


@serve.deployment(max_ongoing_requests=256, graceful_shutdown_timeout_s=2, graceful_shutdown_wait_loop_s=0.5)
class Ingress:
    """The HTTP front (:class:`~eenn.serve.app.Front`) in front of the first tier. With the plan's
    ``monitor:`` section it also holds the :class:`~eenn.serve.monitor.AgreementMonitor` (its
    shadow runs use ``models``, every segment's ONNX bytes) and sends the monitor's current
    thresholds with every request: each tier replica adopts them from the messages it receives
    (:meth:`eenn.serve.tiers.Tier.read`), so a refit reaches every replica with the next
    requests, without a call to each.

    ``local``: where the plan's first tier runs ``with_front``, what this replica builds of it
    itself, ``("tier", (spec, segments' ONNX bytes, settings))`` (a :class:`TierReplica` whose next
    tier is ``first_tier``, the handle of the plan's second tier or None) or ``("noop", (spec,
    num_classes))``: requests then reach the first tier's ``serve.batch`` in this process, without a
    Ray call (on 2 cores, single samples at 32 clients: the one-tier early exit served 1.5-1.7x the
    requests it served as a deployment of its own, docs/serving.md)."""

    def __init__(self, manifest: dict, plan: TierPlan, first_tier, models: dict[int, bytes] | None = None,
                 local: tuple | None = None) -> None:
        timeout = plan.timeout_s * len(plan.tiers) + 1.0  # the tiers' own timeouts fire first
        if local is not None:
            kind, args = local
            self.local = (NoopReplica(*args) if kind == "noop"
                          else TierReplica(manifest, args[0], args[1], first_tier, args[2]))
            call = self.local.__call__  # its hand-offs, if any, time out on their own
        else:
            self.local, first_tier = None, _direct(first_tier)

            async def call(message: bytes) -> dict:
                return await _within(first_tier.remote(message), timeout)

        from ray.serve._private import constants  # this replica's own settings (see ray_env.HAPROXY_ENV)

        ingress = "haproxy" if getattr(constants, "RAY_SERVE_ENABLE_HA_PROXY", False) else "proxy"
        monitor = None
        if plan.monitor is not None:
            from .monitor import AgreementMonitor

            monitor = AgreementMonitor(manifest, config=plan.monitor, threads=plan.threads, models=models)
        self.front = Front(manifest, plan, call, mode="ray", ingress=ingress, monitor=monitor,
                           ship_thresholds=monitor is not None)

    async def __call__(self, request: Request):
        return await self.front.handle(request)

    def __del__(self) -> None:
        if getattr(self, "front", None) is not None and self.front.monitor is not None:
            self.front.monitor.close(timeout=1.0)


def _tier_settings(plan: TierPlan, i: int) -> dict:
    n = len(plan.tiers)
    nxt = plan.tiers[i + 1] if i + 1 < n else None
    return {"float16": plan.float16, "threads": plan.threads, "timeout_s": plan.timeout_s * (n - 1 - i),
            "next_name": nxt.name if nxt else None, "next_replicas": nxt.replicas if nxt else 1,
            "next_max_batch": nxt.max_batch if nxt else None}


def build_app(plan: TierPlan, *, noop: bool = False):
    """The Ray Serve application of ``plan`` (not yet running): an :class:`Ingress` deployment and a
    :data:`TierDeployment` per tier, except a first tier that runs ``with_front``, which the
    ingress replicas hold themselves (the ingress then takes that tier's replicas and actor
    options). ``noop``: the same ingress in front of (or holding) a :class:`NoopReplica` with the
    first tier's batching, replicas and placement instead of the tiers (the framework's own
    ceiling, for benchmarks). A plan's ``monitor:`` runs in the ingress replica (:class:`Ingress`)."""
    manifest = load_manifest(plan.model)
    clean = {k: v for k, v in manifest.items() if k != "_dir"}
    first = plan.tiers[0]
    inline = first.with_front
    front = {"name": "ingress", "ray_actor_options": {"num_cpus": 0}}
    if inline:  # the ingress is the first tier's replicas
        front = {**front, "num_replicas": first.replicas, "ray_actor_options": {"num_cpus": 0, **first.ray_actor_options}}
    if noop:
        args = (asdict(first), int(manifest["num_classes"]))
        quiet = replace(plan, monitor=None)
        if inline:
            return Ingress.options(**front).bind(clean, quiet, None, None, ("noop", args))
        tier = NoopTier.options(name="tier-noop", ray_actor_options={"num_cpus": 0, **first.ray_actor_options},
                                num_replicas=first.replicas, max_ongoing_requests=max(64, first.max_batch)).bind(*args)
        return Ingress.options(**front).bind(clean, quiet, tier)
    nxt, n = None, len(plan.tiers)
    for i in range(n - 1, 0 if inline else -1, -1):  # the last tier first: each binds the next
        spec = plan.tiers[i]
        options = {"num_cpus": 0, **spec.ray_actor_options}
        # room for every batch the replica may hold at once (Ray Serve warns at start otherwise)
        nxt = TierDeployment.options(name=f"tier-{spec.name}", ray_actor_options=options, num_replicas=spec.replicas,
                                     max_ongoing_requests=max(64, spec.max_batch * CONCURRENT_BATCHES)).bind(
            clean, asdict(spec), read_segments(manifest, (spec.start, spec.stop)), nxt, _tier_settings(plan, i))
    models = read_segments(manifest, (0, int(manifest["num_exits"]))) if plan.monitor is not None else None
    local = (("tier", (asdict(first), read_segments(manifest, (first.start, first.stop)), _tier_settings(plan, 0)))
             if inline else None)
    return Ingress.options(**front).bind(clean, plan, nxt, models, local)


def start(plan: TierPlan, address: str | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          num_cpus: int = 2, noop: bool = False, ingress: str = "haproxy") -> str:
    """Deploy ``plan`` and return its URL: on an embedded Ray started here (``address=None``;
    ``num_cpus`` caps it) or on the Ray cluster at ``address`` (``"ray://head:10001"`` or
    ``"auto"``), where eenn's code travels along as a runtime-env module.

    ``ingress``: what takes the HTTP requests on an embedded Ray. ``"haproxy"`` (where
    :func:`haproxy_available`, else ``"proxy"`` with a warning): Ray Serve's high-throughput mode
    (:data:`eenn.serve.ray_env.HAPROXY_ENV`); ``"proxy"``: Ray Serve's Python proxy actor. Either way the same
    deployments answer the same ``POST /predict``. A cluster keeps the mode it was started with
    (set those variables in its nodes' environment for the first). The mode is fixed when Ray
    starts: a process that already runs Ray keeps the one it has."""
    if ingress not in INGRESSES:
        raise ValueError(f"ingress must be one of {', '.join(INGRESSES)}, got {ingress!r}")
    pkg = Path(__file__).resolve().parents[1]  # .../eenn
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if address is None and not ray.is_initialized():
        check_port_free(host, port)
        if ingress == "haproxy" and not haproxy_available():
            import warnings

            warnings.warn("this Ray Serve has no HAProxy ingress (Ray >= 2.55 with ray[serve] on Linux, or "
                          "haproxy on the PATH); serving through Ray Serve's Python proxy", stacklevel=2)
            ingress = "proxy"
        mode = ingress_env(ingress)  # Ray's processes read these when they start (they inherit os.environ)
        os.environ.update(mode)
        env.update(mode)
    # Ray Serve gives a new HTTP proxy 5 s to answer its readiness check before it kills and
    # restarts it; on a busy machine a Python worker takes longer than that to start, and
    # serve.start fails ("the actor never ran"; seen on 2 loaded cores). A minute, unless set.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = os.environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"]
    if not ray.is_initialized():
        if address is None:
            # Workers import this very eenn (a checkout may differ from an installed one).
            path = os.pathsep.join(p for p in (str(pkg.parent), os.environ.get("PYTHONPATH")) if p)
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="warning",
                     object_store_memory=128 * 1024 ** 2, runtime_env={"env_vars": {**env, "PYTHONPATH": path}})
        else:
            ray.init(address=address, logging_level="warning",
                     runtime_env={"py_modules": [str(pkg)], "env_vars": env})
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
    serve.run(build_app(plan, noop=noop), name=APP_NAME, route_prefix="/", blocking=False, logging_config=quiet)
    return f"http://{host}:{port}"


def redeploy(plan: TierPlan, *, noop: bool = False) -> None:
    """Replace the running application (after :func:`start`) by ``plan``'s: the old one is deleted
    first, so that its replicas' CPU reservations are free for the new one's."""
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    serve.delete(APP_NAME)
    serve.run(build_app(plan, noop=noop), name=APP_NAME, route_prefix="/", blocking=False, logging_config=quiet)


def stop(shutdown_ray: bool = True) -> None:
    serve.shutdown()
    if shutdown_ray:
        ray.shutdown()


def serve_plan(plan: TierPlan, address: str | None = None, *, host: str = "127.0.0.1", port: int = 8000,
               ingress: str = "haproxy") -> None:
    """Deploy and serve until interrupted."""
    url = start(plan, address, host=host, port=port, ingress=ingress)
    print(f"eenn: serving {len(plan.tiers)} tiers on Ray Serve at {url} (POST /predict, GET /health); "
          "Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop(shutdown_ray=address is None)
