"""The plan as a Ray Serve application: ingress (HTTP) -> tier 1 -> tier 2 -> ... .

:func:`build_app` makes the :class:`Ingress` deployment (the HTTP front) and one
:data:`~eenn.serve.ray_tiers.TierDeployment` per tier, each bound to the next tier's handle (a
first tier that runs ``with_front`` lives in the ingress replicas instead); :func:`start`,
:func:`redeploy` and :func:`stop` run it on an embedded or a given Ray. Per tier, the plan's
``replicas`` and ``ray_actor_options`` (which can pin tiers to machines with custom resources)
configure the deployment, and ``max_batch`` / ``batch_wait_ms`` its ``serve.batch``
(:mod:`.ray_tiers`). Ray Serve restarts a dead replica on its own, and answers are whole again
once it is back. A plan's ``monitor:`` runs in the ingress replica, whose requests carry the
thresholds it serves to every tier (:class:`Ingress`).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import ray
from ray import serve
from starlette.requests import Request

from ..staged import load_manifest, read_segments
from .app import Front
from .plan import TierPlan
from .ray_env import INGRESSES, check_port_free, free_port, haproxy_available, ingress_env
from .ray_tiers import CONCURRENT_BATCHES, NoopReplica, NoopTier, TierDeployment, TierReplica, _direct, _within

__all__ = ["TierDeployment", "NoopTier", "Ingress", "build_app", "start", "serve_plan", "free_port", "APP_NAME",
           "haproxy_available"]

APP_NAME = "eenn"


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
