"""Multi-tier split serving of an exported model (device -> edge -> cloud).

``serve(plan)`` serves a :class:`TierPlan` (a dict, a YAML/JSON file or the object): on Ray
Serve, embedded (``address=None``) or on an existing cluster (``address="ray://host:10001"``),
or in this process (``local=True``, no Ray). The HTTP API is the same: ``POST /predict``,
``GET /health`` and ``GET /metrics`` (:mod:`.app`); in-process, a plan's ``monitor:`` section adds
an agreement monitor that refits the thresholds under drift (:mod:`.monitor`). The HTTP and Ray
parts are imported on first use, so that ``eenn --help`` needs neither.
"""
from __future__ import annotations

from pathlib import Path

from .codec import decode, encode
from .plan import LinkSpec, TierPlan
from .splits import PlanResult, TierSpeed, expected_latency, measure_segments, plan_splits

__all__ = ["AgreementMonitor", "Front", "InputError", "LinkSpec", "LocalPipeline", "LocalServer", "MonitorConfig",
           "PlanResult", "Tier", "TierPlan", "TierSpeed", "as_plan", "create_app", "decode", "decode_body", "encode",
           "expected_latency", "local_front", "measure_segments", "plan_splits", "serve"]

_LAZY = {"Front": "app", "LocalServer": "app", "create_app": "app", "local_front": "app", "as_plan": "app",
         "InputError": "inputs", "decode_body": "inputs", "LocalPipeline": "local", "Tier": "tiers",
         "AgreementMonitor": "monitor", "MonitorConfig": "monitor"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve(plan: TierPlan | dict | str | Path, address: str | None = None, *, local: bool = False,
          host: str = "127.0.0.1", port: int = 8000, ingress: str = "haproxy") -> None:
    """Serve ``plan`` until interrupted: on Ray Serve (an embedded Ray when ``address`` is None,
    the cluster at ``address`` otherwise), or in this process with ``local=True``. ``ingress``:
    what takes the HTTP requests on an embedded Ray (:func:`eenn.serve.ray_app.start`)."""
    from .app import as_plan

    plan = as_plan(plan)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port must be a number 0-65535 (0: any free one), got {port!r}")
    if local:
        import uvicorn

        from .app import create_app, local_front, uvicorn_config

        sock = _listen(host, port)
        try:
            front = local_front(plan)
            try:
                server = uvicorn.Server(uvicorn_config(create_app(front)))
                print(f"eenn: serving {len(plan.tiers)} tiers in-process at http://{host}:{sock.getsockname()[1]} "
                      "(POST /predict, GET /health, GET /metrics); Ctrl-C stops", flush=True)
                server.run(sockets=[sock])
            finally:
                front.close()
        finally:
            sock.close()
        return
    from .ray_app import serve_plan

    serve_plan(plan, address, host=host, port=port, ingress=ingress)


def _listen(host: str, port: int):
    """A TCP socket bound to ``host:port``, or an error that says why not in one line."""
    import errno
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {host}:{port}: unknown host ({e.strerror}); give --host an address of "
                      "this machine (127.0.0.1, 0.0.0.0)") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        why = ("the port is in use (another server listens on it): stop that one or choose another --port"
               if e.errno == errno.EADDRINUSE else e.strerror or str(e))
        raise OSError(f"cannot listen on {host}:{port}: {why}") from None
    return sock
