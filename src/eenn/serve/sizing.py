"""Sizing a tier plan for a load: per tier ``max_batch``, ``batch_wait_ms``, ``replicas`` and
``ray_actor_options.num_cpus``, proposed from the tiers' measured (or declared) times
(:class:`~eenn.serve.splits.TierSpeed`) and the share of samples that reach each tier; what
``eenn plan`` prints and writes into the plan (docs/serving.md, "Sizing").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .plan import _number
from .splits import TierSpeed

__all__ = ["TierProposal", "propose_serving"]


@dataclass
class TierProposal:
    """What :func:`propose_serving` suggests for one tier, and why (``reasons``)."""

    name: str
    max_batch: int
    batch_wait_ms: float
    replicas: int
    num_cpus: float  # per replica (ray_actor_options)
    reach: float  # share of the samples that reach this tier
    fixed_s: float  # seconds per run whatever its size
    per_sample_s: float  # seconds per sample arriving at the tier
    cores: float  # cores' worth of work the tier gets (replicas * num_cpus, before rounding)
    reasons: list[str] = field(default_factory=list)
    with_front: bool = False  # the first tier runs in the HTTP front's replicas (its work counted in ``cores``)

    def run_s(self, b: int | None = None) -> float:
        """Seconds one run of ``b`` (default ``max_batch``) arriving samples takes."""
        return self.fixed_s + self.per_sample_s * (self.max_batch if b is None else b)

    def options(self) -> dict[str, Any]:
        """The plan keys of this tier (:class:`TierSpec`'s)."""
        return {"max_batch": self.max_batch, "batch_wait_ms": self.batch_wait_ms, "replicas": self.replicas,
                "ray_actor_options": {"num_cpus": self.num_cpus}, **({"with_front": True} if self.with_front else {})}


def propose_serving(manifest: dict[str, Any], bounds: Sequence[tuple[int, int]], speeds: Sequence[TierSpeed],
                    depth: Sequence[float], *, cores: float, concurrency: int | None = None,
                    rate: float | None = None, samples_per_request: int = 1, batch_cap: int = 64,
                    request_overhead_s: float = 0.0, front_s: float = 0.0,
                    with_front: bool = False) -> tuple[list[TierProposal], list[str]]:
    """Per tier ``max_batch``, ``batch_wait_ms``, ``replicas`` and ``ray_actor_options.num_cpus``
    for a load declared as ``concurrency`` closed-loop clients or an arrival ``rate`` (requests/s)
    of ``samples_per_request`` samples each, on ``cores`` cores; plus the lines of reasoning.

    The cost model: a run of ``b`` samples arriving at tier ``t`` takes ``F_t + V_t * b`` seconds,
    where ``F_t`` sums the tier's segments' fixed costs per run and ``V_t`` their costs per sample,
    each segment weighted by the share of the tier's samples still running there (``depth``, the
    share of samples that run to each segment); :meth:`TierSpeed.run_cost` gives the two parts.

    - ``max_batch``: with ``concurrency`` N, every client's samples can be at the tier at once, so
      ``N * samples_per_request * reach_t``; with a ``rate``, the smallest ``b`` for which a run lasts
      no longer than ``b`` samples take to arrive (``rate_t * (F_t + V_t b) <= b``: the tier keeps
      up); at most ``batch_cap``. A tier with a larger fixed cost per run needs larger batches.
    - ``batch_wait_ms``: 0 for ``max_batch`` 1; otherwise the time ``max_batch`` samples take to
      arrive (with a ``rate``), never more than one run of a full batch (waiting longer than a run
      costs more than the batch saves; under load the queue fills while the previous batch runs).
    - ``request_overhead_s``: what each request costs a tier besides the compute (receiving and
      decoding its message, the call, handing on), which batching does not share; it counts in
      keeping up and in the work below (a request reaches tier ``t`` with probability about
      ``reach_t``).
    - ``front_s``: what the HTTP front costs per request (receiving and decoding it, the call into
      the first tier, the JSON answer; on Ray the ingress replica and HAProxy), on the same cores:
      it takes its share of them before the tiers do. ``with_front``: the first tier runs in the
      front's replicas (``with_front: true`` in the plan), so their replicas and CPUs are sized
      for the front's work and the tier's together.
    - cores: tier ``t`` does ``reach_t * (F_t / b_t + V_t + h / s)`` core-seconds of work per sample
      served (``h`` the request overhead, ``s`` samples per request), the front ``front_s / s``;
      the cores are shared in proportion. ``replicas``: as many as the tier has cores of work,
      rounded up (at least 1): a Ray replica computes one batch at a time on one thread, so a tier
      with 1.4 cores of work on one replica leaves its requests queueing while 0.4 of a core it was
      given stays idle (three tiers on 2 cores, 32-sample requests: the device tier with 1.5 cores
      of work served 4803-4891 samples/s as one replica, 5451-5763 as two, benchmarks/serve_cpu.py;
      a tier with less than a core of work keeps one replica, as a second would only add a process
      competing for the cores); ``num_cpus`` per replica = its cores / replicas (rounded down to
      0.05, so that the reservations fit on the machine); in-process a replica computes on as many
      onnxruntime threads as it reserves CPUs, rounded
      (:meth:`~eenn.serve.plan.TierSpec.threads`), so that 1.6 cores of work are not done on one.
    """
    import math

    if (concurrency is None) == (rate is None):
        raise ValueError("declare the load as concurrency (clients) or as rate (requests/s), one of them")
    if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
        raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    if rate is not None and not (_number(rate) and rate > 0):
        raise ValueError(f"rate must be a number of requests per second > 0, got {rate!r}")
    if not (_number(cores) and cores > 0):
        raise ValueError(f"cores must be a number > 0, got {cores!r}")
    if not isinstance(samples_per_request, int) or samples_per_request < 1:
        raise ValueError(f"samples_per_request must be an integer >= 1, got {samples_per_request!r}")
    if not isinstance(batch_cap, int) or batch_cap < 1:
        raise ValueError(f"batch_cap must be an integer >= 1, got {batch_cap!r}")
    if not (_number(request_overhead_s) and request_overhead_s >= 0):
        raise ValueError(f"request_overhead_s must be a number of seconds >= 0, got {request_overhead_s!r}")
    if not (_number(front_s) and front_s >= 0):
        raise ValueError(f"front_s (the front's overhead per request) must be a number of seconds >= 0, got {front_s!r}")
    h = float(request_overhead_s)
    E = int(manifest["num_exits"])
    if len(depth) != E:
        raise ValueError(f"depth distribution has {len(depth)} entries for {E} segments")
    if len(speeds) != len(bounds):
        raise ValueError(f"{len(bounds)} tiers need {len(bounds)} speeds, got {len(speeds)}")
    macs = [s["macs"] for s in manifest["segments"]]
    total = float(sum(depth)) or 1.0
    reach_k = [sum(depth[k:]) / total for k in range(E)]  # share of samples that run segment k
    s = samples_per_request
    props: list[TierProposal] = []
    for (a, b), sp in zip(bounds, speeds):
        if b <= a:
            continue
        reach = reach_k[a]
        fixed = per = 0.0
        for k in range(a, b):
            f, v = sp.run_cost(k, macs[k])
            fixed += f
            per += v * (reach_k[k] / reach if reach > 0 else 0.0)
        props.append(TierProposal(sp.name, 1, 0.0, 1, 0.0, reach, fixed, per, 0.0))
    lines = []
    # batches
    for p in props:
        if concurrency is not None:
            n = concurrency * s * p.reach
            p.max_batch = max(1, min(batch_cap, math.ceil(n - 1e-9)))
            p.reasons.append(f"{concurrency} clients x {s} sample(s) x reach {p.reach:.2f} = {n:.1f} samples can "
                             f"wait here at once -> max_batch {p.max_batch}" + (" (the cap)" if n > batch_cap else ""))
        else:
            lam = rate * s * p.reach  # samples/s arriving at the tier
            busy = lam * (p.per_sample_s + h / s)  # share of a core the samples and requests take, before F
            need = None
            if busy < 1:  # lam F / b + busy <= 1
                need = math.ceil(lam * p.fixed_s / (1 - busy) - 1e-9)
            p.max_batch = max(1, min(batch_cap, need if need is not None else batch_cap))
            p.reasons.append(f"{lam:.1f} samples/s arrive; a run of b takes {1e3 * p.fixed_s:.3f} + "
                             f"{1e3 * p.per_sample_s:.3f} b ms, so b >= {need if need is not None else 'inf'} keeps up "
                             f"on one replica -> max_batch {p.max_batch}")
        if p.max_batch == 1:
            p.batch_wait_ms = 0.0
            p.reasons.append("no batching, so no wait")
        else:
            run = p.run_s()
            wait = run if rate is None else min(run, (p.max_batch - 1) / (rate * s * p.reach))
            p.batch_wait_ms = max(round(1e3 * wait, 1), 0.1)
            p.reasons.append(f"a full batch runs in {1e3 * run:.2f} ms -> batch_wait_ms {p.batch_wait_ms:g}"
                             + ("" if rate is None else f" (the batch takes {1e3 * (p.max_batch - 1) / (rate * s * p.reach):.2f} ms to arrive)"))
    # cores, replicas
    work = [p.reach * (p.fixed_s / p.max_batch + p.per_sample_s + h / s) for p in props]  # core-s per sample
    front = float(front_s) / s
    per_sample = sum(work) + front
    if sum(work) <= 0:
        raise ValueError("the measured or declared tier times are all zero: nothing to share the cores by")
    if props and with_front:
        props[0].with_front = True
    if front > 0:
        lines.append(f"the front: {1e3 * front_s:g} ms per request = {100 * front / per_sample:.0f}% of the work "
                     f"({cores * front / per_sample:.2f} of {cores:g} cores), "
                     + (f"in the replicas of {props[0].name}, which run with it" if with_front else "left to it"))
    for p, w in zip(props, work):
        if p.with_front:  # (the first tier's)
            w += front
            p.reasons.append("runs in the front's replicas: sized for the front's work and its own")
        p.cores = cores * w / per_sample
        p.replicas = max(1, math.ceil(p.cores - 0.05))  # (a 1.03-core tier keeps one replica)
        p.num_cpus = max(math.floor(p.cores / p.replicas * 20) / 20, 0.05)
        p.reasons.append(f"{100 * w / per_sample:.0f}% of the work ({1e3 * w:.3f} ms per sample served) -> "
                         f"{p.cores:.2f} of {cores:g} cores -> {p.replicas} replica(s) x num_cpus {p.num_cpus:g}")
    capacity = cores / per_sample  # samples/s when every core works
    lines.append(f"capacity: {capacity:.0f} samples/s ({capacity / s:.0f} requests/s of {s}) when all {cores:g} cores "
                 f"work ({1e3 * per_sample:.3f} core-ms per sample served)")
    if rate is not None:
        util = rate * s * per_sample / cores
        lines.append(f"declared {rate:g} requests/s -> {100 * util:.0f}% of the cores busy (the front included)"
                     + ("; overloaded: more cores or a lighter plan" if util > 1 else ""))
    return props, lines
