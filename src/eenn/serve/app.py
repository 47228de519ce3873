"""The HTTP front: ``POST /predict``, ``GET /health`` and ``GET /metrics`` (Prometheus text), the
same for the in-process and the Ray Serve deployments. Only the way the first tier is called
differs (``call``). In the in-process mode a plan's ``monitor:`` section adds an
:class:`~eenn.serve.monitor.AgreementMonitor` fed by the served requests."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..io import encode_inf
from ..policies import ExitPolicy
from ..manifest import load_manifest
from .inputs import InputError, decode_body
from .monitor_config import thresholds_of
from .prometheus import prometheus_text
from .plan import LinkSpec, TierPlan, TierSpec
from .local import LocalPipeline
from .tiers import build_response, start_message

__all__ = ["Front", "as_plan", "create_app", "LocalServer", "local_front", "uvicorn_config", "METRICS_TYPE"]

Call = Callable[[bytes], Awaitable[dict]]
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the Prometheus text exposition format
ROUTES = {"/predict": ("POST",), "/health": ("GET",), "/metrics": ("GET",), "/monitor/revert": ("POST",)}
BODY_STALL_S = 30.0  # the longest wait for the next part of a request body (then 408)
DECODE_INLINE_BYTES = 64 * 1024  # larger bodies are decoded in a worker thread
_log = logging.getLogger("eenn.serve")


class Front:
    """Validates a request, sends it into the first tier through ``call`` and shapes the answer."""

    def __init__(self, manifest: dict[str, Any], plan: TierPlan, call: Call, *, mode: str, monitor=None,
                 ingress: str | None = None, ship_thresholds: bool = False) -> None:
        self.manifest, self.plan, self.call, self.mode = manifest, plan, call, mode
        self.ingress = ingress  # on Ray: what takes the HTTP requests ("haproxy" or "proxy"), reported on /health
        self.monitor = monitor  # an AgreementMonitor (fed every served batch) or None
        self.served = 0  # requests answered
        self.samples = 0
        self.exit_answers = [0] * int(manifest["num_exits"])
        self.degraded = 0
        self.rejected: dict[int, int] = {}  # status -> requests refused or failed
        # per tier: [requests that ran there, seconds they waited for their batch, samples of those batches]
        self.tier_counts: dict[str, list] = {t.name: [0, 0.0, 0] for t in plan.tiers}
        self._policy = ExitPolicy.from_dict(manifest["policy"])
        self.closers: list[Callable[[], Any]] = []  # called by close()
        # the thresholds travel with each request (the tiers adopt them): where the tiers are
        # other processes that the monitor's refits cannot reach otherwise (Ray)
        self.ship_thresholds = ship_thresholds

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused as soon as it passes the plan's ``max_body_bytes`` (413),
        when a part of it takes longer than :data:`BODY_STALL_S` to come (408: a client that
        announced more than it sends holds a connection otherwise), when it comes compressed
        (415), or when the client hangs up before the end (:class:`_Gone`)."""
        from starlette.requests import ClientDisconnect

        limit = self.plan.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise InputError(413, f"body of {declared} bytes is larger than the limit of {limit} bytes")
        coding = request.headers.get("content-encoding", "identity").strip().lower()
        if coding not in ("", "identity"):
            raise InputError(415, f"Content-Encoding {coding!r} is not supported: send the body uncompressed")
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        try:
            # one deadline for the whole read, moved on with every part (not a task per part: this
            # runs for every request)
            async with asyncio.timeout(BODY_STALL_S) as deadline:
                async for chunk in request.stream():
                    deadline.reschedule(loop.time() + BODY_STALL_S)
                    size += len(chunk)
                    if size > limit:  # stop reading as soon as the limit is passed
                        raise InputError(413, f"body larger than the limit of {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise InputError(408, f"no part of the body came for {BODY_STALL_S:g} s ({size} bytes read"
                                  + (f" of {declared}" if declared else "") + ")") from None
        except ClientDisconnect:
            raise _Gone() from None
        return b"".join(chunks)

    async def handle(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/") or "/", request.method
        allowed = ROUTES.get(path)
        if allowed is None:
            return _error(404, f"no route {path}; the routes are POST /predict, GET /health, GET /metrics and "
                               "POST /monitor/revert")
        if method not in allowed and not (method == "HEAD" and "GET" in allowed):
            use = {"/predict": "use POST /predict with an image, a .npy array or a JSON array as the body"}.get(
                path, f"use {allowed[0]} {path}")
            return _error(405, use, headers={"Allow": ", ".join([*allowed, *(["HEAD"] if "GET" in allowed else [])])})
        if path == "/health":
            return JSONResponse(self.health())
        if path == "/metrics":
            return Response(self.metrics(), media_type=METRICS_TYPE)
        if path == "/predict":
            return await self.predict(request)
        return await self.revert()

    async def revert(self) -> JSONResponse:
        """``POST /monitor/revert``: serve the thresholds before the monitor's last change again
        (:meth:`~eenn.serve.monitor.AgreementMonitor.revert`); the answer is the logged change."""
        if self.monitor is None:
            return _error(404, "this server has no agreement monitor: add a monitor: section to the plan")
        try:
            entry = await asyncio.get_running_loop().run_in_executor(None, self.monitor.revert)
        except ValueError as e:  # nothing to revert
            return _error(409, str(e))
        return JSONResponse(encode_inf(entry))

    async def predict(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            body = await self.read_body(request)
            args = (body, request.headers.get("content-type", ""), self.manifest)
            limits = {"max_bytes": self.plan.max_body_bytes, "max_batch": self.plan.max_batch}
            if len(body) <= DECODE_INLINE_BYTES:  # a small body: decoded here, quicker than a thread hop
                x = decode_body(*args, **limits)
            else:  # parsing megabytes of JSON or decoding a large image would hold every other request
                x = await asyncio.get_running_loop().run_in_executor(None, lambda: decode_body(*args, **limits))
        except InputError as e:
            self._reject(e.status)
            return _error(e.status, e.message)
        except _Gone:  # nobody to answer: counted, one line in the log
            self._reject(499)
            _log.info("a client hung up before its request body ended")
            return Response(status_code=499)
        single = x.shape[0] == 1
        try:
            th = thresholds_of(self.policy, int(self.manifest["num_exits"])) if self.ship_thresholds else None
            reply = await self.call(start_message(self.manifest, x, th))
        except Exception as e:  # the first tier failed: no exit computed, no answer to give
            first = self.plan.tiers[0].name
            self._reject(503)
            return _error(503, f"the first tier {first!r} is unavailable ({type(e).__name__}: {e}); retry later")
        out = build_response(self.manifest, reply, x.shape[0], time.perf_counter() - t0, single)
        self.served += 1
        self.samples += x.shape[0]
        for e in reply["answers"]["exit"]:
            self.exit_answers[int(e)] += 1
        self.degraded += sum(bool(d) for d in reply["answers"]["degraded"])
        for t in reply["tiers"]:
            c = self.tier_counts.setdefault(t["name"], [0, 0.0, 0])
            c[0] += 1
            c[1] += t.get("wait_s", 0.0)
            c[2] += t.get("batch", t["samples"])
        if self.monitor is not None:
            self.monitor.observe(x)  # queues the shadow share; never blocks
        return JSONResponse(out)

    def _reject(self, status: int) -> None:
        self.rejected[status] = self.rejected.get(status, 0) + 1

    @property
    def policy(self) -> ExitPolicy:
        """The policy served now (the monitor's, which it may have refitted, else the export's)."""
        return self.monitor.policy if self.monitor is not None else self._policy

    def health(self) -> dict[str, Any]:
        m = self.manifest
        return {"status": "ok", "mode": self.mode, **({"ingress": self.ingress} if self.ingress else {}),
                "served": self.served,
                "model": {"num_exits": m["num_exits"], "num_classes": m["num_classes"],
                          "input_shape": m["input_shape"], "policy": m["policy"].get("rule") or m["policy"].get("name")},
                "tiers": [{"name": t.name, "segments": [t.start, t.stop - 1],
                           **({"with_front": True} if t.with_front and self.mode == "ray" else {})}
                          for t in self.plan.tiers],
                "thresholds": encode_inf(thresholds_of(self.policy, int(m["num_exits"]))),
                "monitor": self.monitor.stats() if self.monitor is not None else None}

    def metrics(self) -> str:
        """``GET /metrics``: the counters and, with a monitor, the agreement on its window, in the
        Prometheus text exposition format."""
        E = int(self.manifest["num_exits"])
        th = thresholds_of(self.policy, E)
        fams = [
            ("eenn_requests_total", "counter", "Prediction requests answered.", [({}, self.served)]),
            ("eenn_samples_total", "counter", "Samples answered (a request may carry a batch).", [({}, self.samples)]),
            ("eenn_exit_answers_total", "counter", "Samples answered by each exit.",
             [({"exit": str(k)}, self.exit_answers[k]) for k in range(E)]),
            ("eenn_degraded_total", "counter", "Samples answered by a shallower exit because a tier was down.",
             [({}, self.degraded)]),
            ("eenn_rejected_total", "counter", "Prediction requests refused or failed, by HTTP status.",
             [({"status": str(k)}, v) for k, v in sorted(self.rejected.items())]),
            ("eenn_threshold", "gauge", "The exit threshold served now, per non-final exit.",
             [({"exit": str(k)}, v) for k, v in enumerate(th)]),
            ("eenn_tier_requests_total", "counter", "Answered requests that ran some of their samples at each tier.",
             [({"tier": n}, c[0]) for n, c in self.tier_counts.items()]),
            ("eenn_tier_batch_wait_seconds_total", "counter", "Seconds those requests waited at each tier for their "
             "batch to run (the batching window, or the run before).", [({"tier": n}, c[1]) for n, c in
                                                                         self.tier_counts.items()]),
            ("eenn_tier_batch_samples_total", "counter", "Samples of the batches those requests ran in at each tier, "
             "once per request (over eenn_tier_requests_total: the mean batch a request ran in).",
             [({"tier": n}, c[2]) for n, c in self.tier_counts.items()]),
        ]
        mon = self.monitor
        if mon is not None:
            st = mon.stats(last=0)
            per_exit = st["exit_agreement"]
            fams += [
                ("eenn_shadow_samples_total", "counter", "Served samples run to the final exit in the background.",
                 [({}, st["processed"])]),
                ("eenn_shadow_dropped_total", "counter", "Samples chosen for the shadow run but dropped (queue full).",
                 [({}, st["dropped"])]),
                ("eenn_window_samples", "gauge", "Shadow samples in the monitor's window.", [({}, st["window_fill"])]),
                ("eenn_exit_agreement", "gauge",
                 "Share of window samples on which each exit agrees with the final exit.",
                 [({"exit": str(k)}, v) for k, v in enumerate(per_exit)] if per_exit is not None else []),
                ("eenn_served_agreement", "gauge", "Share of window samples on which the served answer (the current "
                 "thresholds) agrees with the final exit.",
                 [({}, st["served_agreement"])] if st["served_agreement"] is not None else []),
                ("eenn_agreement_goal", "gauge", "The served agreement the monitor keeps: 1 - max_drop.",
                 [({}, st["goal"])]),
                ("eenn_expected_macs_fraction", "gauge", "Expected MACs per window sample under the current "
                 "thresholds, as a share of the full model's.",
                 [({}, st["macs_fraction"])] if st["macs_fraction"] is not None else []),
                ("eenn_threshold_changes_total", "counter", "Threshold changes (refits and reverts).",
                 [({}, st["changes_total"])]),
            ]
        return prometheus_text(fams)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
        for close in self.closers:
            close()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


class _Gone(Exception):
    """The client hung up while its request body was being read."""


class _App:
    """The ASGI app of a :class:`Front`: every request, on any path and with any method, goes to
    :meth:`Front.handle`, which answers unknown paths (404) and methods (405, with ``Allow``) in
    JSON as it answers the rest (no redirect of ``/predict/``; ``HEAD`` where ``GET`` is served)."""

    def __init__(self, front: Front) -> None:
        self.front = front

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan, websockets: not served
            return
        response = await self.front.handle(Request(scope, receive))
        await response(scope, receive, send)


def create_app(front: Front) -> _App:
    """The ASGI app serving ``front`` (any ASGI server runs it; uvicorn here: :func:`uvicorn_config`)."""
    return _App(front)


def uvicorn_config(app, **kw):
    """uvicorn's settings for an eenn front, with the limits a server facing clients needs: at most
    half the open files this process may hold as connections and requests at once (503 beyond,
    instead of failing to accept), idle keep-alive connections kept 30 s, and 5 s for requests in
    flight to finish once asked to stop (a client that never ends its upload cannot hold the
    shutdown). uvicorn's parser has no limit on header size and no time limit on a request's
    head: in front of untrusted clients put a proxy that has them (HAProxy, as the Ray mode does)."""
    import resource

    import uvicorn

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = max(64, (soft if soft != resource.RLIM_INFINITY else 4096) // 2)
    options = dict(log_level="warning", access_log=False, lifespan="off", limit_concurrency=cap,
                   timeout_keep_alive=30, timeout_graceful_shutdown=5)
    return uvicorn.Config(app, **{**options, **kw})


def as_plan(plan: TierPlan | dict | str | Path) -> TierPlan:
    """A :class:`TierPlan` from a plan, its dict or a YAML/JSON file; a plan built directly is
    checked as a parsed one is (its tiers :class:`TierSpec`, taking consecutive segments from 0)."""
    if isinstance(plan, dict):
        return TierPlan.from_dict(plan)
    if not isinstance(plan, TierPlan):
        return TierPlan.load(plan)
    at = 0
    for t in plan.tiers:
        if not isinstance(t, TierSpec) or t.start != at or not t.start < t.stop:
            got = repr(t) if not isinstance(t, TierSpec) else f"tier {t.name!r} with segments {t.start}..{t.stop - 1}"
            raise ValueError(f"TierPlan tiers must be TierSpec(name, start, stop) taking consecutive segments from 0, "
                             f"got {got:.120}; or pass the plan as a dict (TierPlan.from_dict({{'model': ..., "
                             "'tiers': [{'name': ..., 'segments': 'rest'}]}))")
        at = t.stop
    exits = int(load_manifest(plan.model)["num_exits"])
    if at != exits:
        raise ValueError(f"the plan's tiers cover segments 0..{at - 1} of the model's 0..{exits - 1}; the last tier "
                         f"must stop at {exits}")
    if not all(isinstance(link, LinkSpec) for link in plan.links):
        raise ValueError(f"TierPlan links must be LinkSpec(bandwidth, latency_s), got {plan.links!r:.120}")
    return plan


def local_front(plan: TierPlan | dict | str | Path) -> Front:
    """A front whose tiers run in this process (each request in a worker thread of its own pool;
    each tier runs one batch at a time, as its ``max_batch``/``batch_wait_ms`` gather them); with
    the plan's ``monitor:`` section, an agreement monitor whose new thresholds go to every tier's
    runner. ``plan``: as :func:`as_plan` takes it."""
    from concurrent.futures import ThreadPoolExecutor

    plan = as_plan(plan)
    pipe = LocalPipeline(plan)
    # enough request threads to fill the largest batch from single-sample requests
    pool = ThreadPoolExecutor(max_workers=min(256, max(16, 2 * max(t.max_batch for t in plan.tiers))),
                              thread_name_prefix="eenn-request")

    async def call(message: bytes) -> dict:
        return await asyncio.get_running_loop().run_in_executor(pool, pipe, message)

    monitor = None
    if plan.monitor is not None:
        from .monitor import AgreementMonitor

        def apply(policy) -> None:  # between requests: a request sees one policy on every tier
            with pipe.quiesced():
                for tier in pipe.tiers:
                    tier.runner.set_policy(policy)

        monitor = AgreementMonitor(pipe.manifest, config=plan.monitor, apply=apply, threads=plan.threads)
    front = Front(pipe.manifest, plan, call, mode="local", monitor=monitor)
    front.pipeline = pipe
    front.closers.append(lambda: (pipe.close(), pool.shutdown(wait=False)))
    return front


class LocalServer:
    """The in-process mode behind a real HTTP socket: ``with LocalServer(plan) as url: ...``
    (``port=0`` picks a free port)."""

    def __init__(self, plan: TierPlan | dict | str | Path, *, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.front = local_front(plan)
        self.app = create_app(self.front)
        self.server = uvicorn.Server(uvicorn_config(self.app, host=host, port=port))
        self.thread: threading.Thread | None = None
        self.host = host

    def start(self) -> str:
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="eenn-local-server")
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the local server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.front.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
