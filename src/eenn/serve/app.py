"""The HTTP front: ``POST /predict``, ``GET /health``, the same for the in-process and the Ray
Serve deployments. Only the way the first tier is called differs (``call``)."""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse

from .inputs import InputError, decode_body
from .plan import TierPlan
from .tiers import LocalPipeline, build_response, start_message

__all__ = ["Front", "create_app", "LocalServer", "local_front"]

Call = Callable[[bytes], Awaitable[dict]]


class Front:
    """Validates a request, sends it into the first tier through ``call`` and shapes the answer."""

    def __init__(self, manifest: dict[str, Any], plan: TierPlan, call: Call, *, mode: str) -> None:
        self.manifest, self.plan, self.call, self.mode = manifest, plan, call, mode
        self.served = 0

    async def read_body(self, request: Request) -> bytes:
        limit = self.plan.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise InputError(413, f"body of {declared} bytes is larger than the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():  # stop reading as soon as the limit is passed
            size += len(chunk)
            if size > limit:
                raise InputError(413, f"body larger than the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def handle(self, request: Request) -> JSONResponse:
        path, method = request.url.path.rstrip("/") or "/", request.method
        if path == "/health":
            if method != "GET":
                return _error(405, "use GET /health")
            return JSONResponse(self.health())
        if path == "/predict":
            if method != "POST":
                return _error(405, "use POST /predict with an image, a .npy array or a JSON array as the body")
            return await self.predict(request)
        return _error(404, f"no route {path}; the routes are POST /predict and GET /health")

    async def predict(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            body = await self.read_body(request)
            x = decode_body(body, request.headers.get("content-type", ""), self.manifest,
                            max_bytes=self.plan.max_body_bytes, max_batch=self.plan.max_batch)
        except InputError as e:
            return _error(e.status, e.message)
        single = x.shape[0] == 1
        try:
            reply = await self.call(start_message(self.manifest, x))
        except Exception as e:  # the first tier failed: no exit computed, no answer to give
            first = self.plan.tiers[0].name
            return _error(503, f"the first tier {first!r} is unavailable ({type(e).__name__}: {e}); retry later")
        self.served += 1
        return JSONResponse(build_response(self.manifest, reply, x.shape[0], time.perf_counter() - t0, single))

    def health(self) -> dict[str, Any]:
        m = self.manifest
        return {"status": "ok", "mode": self.mode, "served": self.served,
                "model": {"num_exits": m["num_exits"], "num_classes": m["num_classes"],
                          "input_shape": m["input_shape"], "policy": m["policy"].get("rule") or m["policy"].get("name")},
                "tiers": [{"name": t.name, "segments": [t.start, t.stop - 1]} for t in self.plan.tiers]}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def create_app(front: Front):
    """A Starlette ASGI app serving ``front`` (any ASGI server runs it; uvicorn here)."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    async def endpoint(request: Request):
        return await front.handle(request)

    routes = [Route("/predict", endpoint, methods=["GET", "POST", "PUT"]),
              Route("/health", endpoint, methods=["GET", "POST"])]
    app = Starlette(routes=routes)
    app.state.front = front
    return app


def local_front(plan: TierPlan) -> Front:
    """A front whose tiers run in this process (each request in a worker thread)."""
    pipe = LocalPipeline(plan)
    lock = threading.Lock()  # one request at a time through the tiers: the cores are the tiers' own

    def run(message: bytes) -> dict:
        with lock:
            return pipe(message)

    async def call(message: bytes) -> dict:
        return await asyncio.to_thread(run, message)

    front = Front(pipe.manifest, plan, call, mode="local")
    front.pipeline = pipe
    return front


class LocalServer:
    """The in-process mode behind a real HTTP socket: ``with LocalServer(plan) as url: ...``
    (``port=0`` picks a free port)."""

    def __init__(self, plan: TierPlan, *, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.front = local_front(plan)
        self.app = create_app(self.front)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning",
                                                    access_log=False, lifespan="off"))
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

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
