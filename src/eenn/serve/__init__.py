"""Multi-tier split serving of an exported model (device -> edge -> cloud).

``serve(plan)`` serves a :class:`TierPlan` (a dict, a YAML/JSON file or the object): in this
process (``local=True``, the default without Ray) or on Ray Serve, embedded (``address=None``)
or on an existing cluster (``address="ray://host:10001"``). The HTTP API is the same:
``POST /predict`` and ``GET /health`` (:mod:`.app`). Ray is imported only for the Ray mode.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .app import Front, LocalServer, create_app, local_front
from .codec import decode, encode
from .inputs import InputError, decode_body
from .plan import LinkSpec, PlanResult, TierPlan, TierSpeed, expected_latency, measure_segments, plan_splits
from .tiers import LocalPipeline, Tier

__all__ = ["Front", "InputError", "LinkSpec", "LocalPipeline", "LocalServer", "PlanResult", "Tier", "TierPlan",
           "TierSpeed", "as_plan", "create_app", "decode", "decode_body", "encode", "expected_latency",
           "local_front", "measure_segments", "plan_splits", "serve"]


def as_plan(plan: TierPlan | dict | str | Path) -> TierPlan:
    if isinstance(plan, TierPlan):
        return plan
    if isinstance(plan, dict):
        return TierPlan.from_dict(plan)
    return TierPlan.load(plan)


def serve(plan: TierPlan | dict | str | Path, address: str | None = None, *, local: bool = False,
          host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``plan`` until interrupted: in this process with ``local=True``, else on Ray Serve
    (an embedded Ray when ``address`` is None, the cluster at ``address`` otherwise)."""
    plan = as_plan(plan)
    if local:
        import uvicorn

        front = local_front(plan)
        print(f"eenn: serving {len(plan.tiers)} tiers in-process at http://{host}:{port} "
              "(POST /predict, GET /health); Ctrl-C stops", flush=True)
        uvicorn.run(create_app(front), host=host, port=port, log_level="warning", lifespan="off")
        return
    from .ray_app import serve_plan

    serve_plan(plan, address, host=host, port=port)
