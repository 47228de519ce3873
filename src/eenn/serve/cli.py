"""``eenn serve`` and ``eenn plan`` (and ``eenn export``, from :mod:`eenn.export_cli`): registered on
the main parser by :func:`add_parsers`; each parser's ``run`` default is the function to call with
the parsed args."""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_parsers", "run_serve", "run_plan"]

EPILOG_SERVE = """examples:
  eenn serve --plan plan.yaml                          # embedded Ray on this machine, port 8000
  eenn serve --plan plan.yaml --local --port 8080      # in-process, no Ray
  eenn serve --plan plan.yaml --address ray://head:10001
  curl -s -X POST --data-binary @digit.png -H 'Content-Type: image/png' localhost:8000/predict
  curl -s localhost:8000/health
  curl -s localhost:8000/metrics                       # Prometheus text format

plan.yaml:
  model: export/
  tiers:
    - {name: device, segments: "0-1"}
    - {name: edge, segments: "2"}
    - {name: cloud, segments: rest}
  # per tier, optionally: max_batch: 32, batch_wait_ms: 2 (batch concurrent requests; the window
  #   shortens while requests stop joining it, adaptive_wait: false keeps it fixed);
  #   on Ray also replicas: 2, ray_actor_options: {num_cpus: 1}; and on the first tier
  #   with_front: true (it runs inside the HTTP ingress replicas: one Ray call less per request)
  # optionally: monitor: {shadow_fraction: 0.1, window: 512, max_drop: 0.01} (on Ray in the ingress)
"""

EPILOG_PLAN = """examples:
  eenn plan export/ --tier device=5e7 --tier edge=1e9 --tier cloud=1e10 \\
      --link 1e6,0.010 --link 1e7,0.030 --out plan.yaml
  eenn plan export/ --tier device=measure --tier edge=measure:4 --link 1e9,0.0001
  eenn plan export/ --tier device=measure --tier edge=measure --tier cloud=measure \\
      --link 1e9,0.0001 --link 1e9,0.0001 --split 0-1,2,3 --cores 2 --concurrency 32 --out plan.yaml

--tier NAME=MACS_PER_S[,OVERHEAD_S] declares a tier's speed; NAME=measure times the segments on
this machine; NAME=measure:F assumes a tier F times faster than this machine. --link
BYTES_PER_S,LATENCY_S (one way) per pair of neighbouring tiers. --split fixes the segments of each
tier (comma-separated, one per tier: k, a-b or rest) instead of choosing them.

With --concurrency N (closed-loop clients) or --rate R (requests/s), and --cores, it also proposes
each tier's max_batch, batch_wait_ms, replicas and ray_actor_options.num_cpus from the segment
times (measured at batch 1 and at --measure-batch for NAME=measure tiers; per run and per MAC for
declared ones) and the share of samples that reach each tier, prints why, and writes them into the
plan (eenn.serve.sizing.propose_serving). The first tier runs inside the HTTP front's replicas on
Ray (with_front: true, sized for the front's work and its own) unless --no-with-front.
"""


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number 0-65535 (0: any free one), got {text!r}")
    return port


def add_parsers(subparsers) -> None:
    """Register ``export`` (:mod:`eenn.export_cli`), ``serve`` and ``plan`` on the main parser's subparsers."""
    from ..export_cli import add_parser as add_export

    raw = argparse.RawDescriptionHelpFormatter
    add_export(subparsers)

    s = subparsers.add_parser("serve", help="serve an exported model split over tiers (Ray Serve or in-process)",
                              description="Serve a tier plan: POST /predict (image, .npy or JSON array), "
                              "GET /health and GET /metrics.", epilog=EPILOG_SERVE, formatter_class=raw)
    s.add_argument("--plan", required=True, help="plan file (YAML or JSON)")
    s.add_argument("--address", default=None, help="an existing Ray cluster (ray://host:10001 or auto)")
    s.add_argument("--local", action="store_true", help="run every tier in this process, without Ray")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_port, default=8000)
    s.add_argument("--ingress", default="haproxy", choices=["haproxy", "proxy"],
                   help="on an embedded Ray: HAProxy in front of the ingress replica (Ray Serve's high-throughput "
                        "mode; the default where this Ray has it) or Ray Serve's Python proxy")
    s.set_defaults(run=run_serve)

    p = subparsers.add_parser("plan", help="choose split points that minimise the expected latency",
                              description="Choose the split of an exported model over tiers from tier speeds, "
                              "link costs and the validation exit distribution.", epilog=EPILOG_PLAN,
                              formatter_class=raw)
    p.add_argument("export_dir")
    p.add_argument("--tier", action="append", required=True, metavar="NAME=SPEED", type=_usage(_tier_syntax))
    p.add_argument("--link", action="append", default=[], metavar="BYTES_PER_S,LATENCY_S", type=_usage(_link))
    p.add_argument("--float16", action="store_true", help="features cross tiers as float16")
    p.add_argument("--out", default=None, help="write the chosen plan (YAML) here")
    p.add_argument("--split", default=None, metavar="SEGS,SEGS,...",
                   help="the segments of each tier, e.g. 0,1-2,rest (default: the split of least expected latency)")
    p.add_argument("--concurrency", type=int, default=None, help="propose batching for N concurrent clients")
    p.add_argument("--rate", type=float, default=None, help="propose batching for R requests/s arriving")
    p.add_argument("--cores", type=float, default=None, help="cores to share among the tiers (default: this machine's)")
    p.add_argument("--samples-per-request", type=int, default=1, help="samples each request carries (default 1)")
    p.add_argument("--batch-cap", type=int, default=64, help="the largest max_batch proposed (default 64)")
    p.add_argument("--request-overhead-ms", type=float, default=0.0,
                   help="what each request costs a tier besides compute (decoding, the call); default 0")
    p.add_argument("--front-ms", type=float, default=0.0,
                   help="what the HTTP front costs per request on the same cores (on Ray: the ingress and HAProxy; "
                        "about 0.9 ms on a 2-core EPYC, docs/serving.md), so the tiers share what is left; default 0")
    p.add_argument("--with-front", action=argparse.BooleanOptionalAction, default=True,
                   help="run the first tier inside the HTTP front's replicas on Ray (the default: no Ray call "
                        "between them, 1.5-1.6x the single-sample requests/s on a 2-core EPYC, docs/serving.md); "
                        "--no-with-front keeps it a deployment of its own, e.g. to pin it to a GPU or a custom "
                        "resource without taking the HTTP front there")
    p.add_argument("--measure-batch", type=int, default=32,
                   help="the batch at which NAME=measure tiers are also timed (default 32)")
    p.set_defaults(run=run_plan)


def run_serve(args) -> int:
    from . import as_plan, serve

    serve(as_plan(args.plan), args.address, local=args.local, host=args.host, port=args.port,
          ingress=args.ingress)
    return 0


def _speeds(specs: list[str], manifest: dict, batch: int = 1):
    from .splits import TierSpeed, measure_segments

    speeds, measured, batched = [], None, None
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--tier takes NAME=SPEED, got {spec!r}")
        if value == "measure" or value.startswith("measure:"):
            if measured is None:
                measured = measure_segments(manifest)
                if batch > 1:
                    batched = measure_segments(manifest, batch=batch, repeats=10)[0]
            factor = _factor(spec, value)
            speeds.append(TierSpeed(name, segment_s=[t / factor for t in measured[0]], answer_s=measured[1] / factor,
                                    batch_s=None if batched is None else [t / factor for t in batched], batch=batch))
        else:
            speeds.append(TierSpeed(name, *_declared(spec, value)))
    names = [s.name for s in speeds]
    if len(set(names)) != len(names):
        raise ValueError(f"--tier names must be distinct, got {', '.join(names)}")
    return speeds


def _usage(check):
    """An argparse ``type`` from ``check(text)``: its ValueError becomes a usage error (exit 2)."""
    def parse(text: str) -> str:
        try:
            check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    return parse


def _tier_syntax(spec: str) -> None:
    """Refuse a ``--tier`` that is not NAME=MACS_PER_S[,OVERHEAD_S], NAME=measure or NAME=measure:F."""
    name, sep, value = spec.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--tier takes NAME=SPEED, got {spec!r}")
    if value == "measure" or value.startswith("measure:"):
        _factor(spec, value)
    else:
        _declared(spec, value)


def _factor(spec: str, value: str) -> float:
    try:
        factor = float(value.partition(":")[2] or 1.0)
    except ValueError:
        raise ValueError(f"--tier {spec!r}: measure:F takes a number F (how many times faster)") from None
    if not 0 < factor < float("inf"):
        raise ValueError(f"--tier {spec!r}: the speed factor must be a number > 0")
    return factor


def _link(text: str):
    from .plan import LinkSpec

    try:
        bw, lat = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--link takes BYTES_PER_S,LATENCY_S, got {text!r}") from None
    try:
        return LinkSpec(bw, lat)
    except ValueError as e:
        raise ValueError(f"--link {text!r}: {e}") from None


def _declared(spec: str, value: str) -> tuple[float, float]:
    """``(MACs/s, overhead s)`` of ``--tier NAME=MACS_PER_S[,OVERHEAD_S]``."""
    parts = value.split(",")
    try:
        nums = [float(v) for v in parts]
    except ValueError:
        nums = []
    if len(nums) not in (1, 2) or len(nums) != len(parts):
        raise ValueError(f"--tier {spec!r}: SPEED is MACS_PER_S[,OVERHEAD_S] in numbers (e.g. device=5e7 or "
                         "device=5e7,0.0002), measure, or measure:F")
    if not 0 < nums[0] < float("inf"):
        raise ValueError(f"--tier {spec!r}: MACS_PER_S must be a number > 0, got {parts[0]}")
    if len(nums) > 1 and not 0 <= nums[1] < float("inf"):
        raise ValueError(f"--tier {spec!r}: OVERHEAD_S must be a number of seconds >= 0, got {parts[1]}")
    return nums[0], nums[1] if len(nums) > 1 else 0.0


def _split(text: str, names: list[str], num_exits: int) -> list[tuple[int, int]]:
    from .plan import _segments

    specs = [t.strip() for t in text.split(",")]
    if len(specs) != len(names):
        raise ValueError(f"--split gives {len(specs)} tiers' segments for {len(names)} tiers ({text!r})")
    bounds, at = [], 0
    for spec, name in zip(specs, names):
        try:
            a, b = _segments(spec, at, num_exits, name)
        except ValueError as e:
            raise ValueError(f"--split {text!r}: {e}") from None
        if a != at:
            raise ValueError(f"--split: tier {name!r} starts at segment {a}, not {at}: tiers take consecutive "
                             "segments in order")
        bounds.append((a, b))
        at = b
    if at != num_exits:
        raise ValueError(f"--split covers segments 0..{at - 1} of 0..{num_exits - 1} (the last tier can say rest)")
    return bounds


def run_plan(args) -> int:
    from ..io import writable_text_file
    from ..staged import load_manifest
    from .sizing import propose_serving
    from .splits import expected_latency, plan_splits

    if args.out:  # before the segments are timed: a path that would replace a checkpoint is refused
        writable_text_file(args.out, "a plan")

    batching = args.concurrency is not None or args.rate is not None
    if args.concurrency is not None and args.rate is not None:
        raise ValueError("give --concurrency or --rate, not both")
    if args.measure_batch < 1:
        raise ValueError(f"--measure-batch must be >= 1, got {args.measure_batch}")
    m = load_manifest(args.export_dir)
    speeds = _speeds(args.tier, m, args.measure_batch if batching else 1)
    links = [_link(text) for text in args.link]
    names = [s.name for s in speeds]
    depth = (m.get("validation") or {}).get("depth_distribution")
    if depth is None:
        raise ValueError(f"{args.export_dir} has no validation exit distribution, which planning needs: export "
                         "with `eenn export CKPT --dataset NAME` (or --calibration FILE), or in Python give eenn.export "
                         "validation=eenn.exporter.calibration_record(net, data.val, policy, goal)['validation']")
    if args.split is not None:
        if len(links) != len(speeds) - 1:
            raise ValueError(f"{len(speeds)} tiers need {len(speeds) - 1} links, got {len(links)}")
        bounds = _split(args.split, names, int(m["num_exits"]))
        predicted, per_depth = expected_latency(m, bounds, speeds, links, depth, float16=args.float16)
        print(f"expected latency {1e3 * predicted:.3f} ms with the given split "
              + ", ".join(f"{n}: {a}-{b - 1}" for n, (a, b) in zip(names, bounds)))
        print("latency by depth (ms): " + " ".join(f"{1e3 * t:.3f}" for t in per_depth))
    else:
        r = plan_splits(m, speeds, links, float16=args.float16)
        bounds = r.bounds
        print(f"expected latency {1e3 * r.predicted_s:.3f} ms with "
              + ", ".join(f"{n}: {a}-{b - 1}" if b > a else f"{n}: -" for n, (a, b) in zip(names, r.bounds)))
        print("latency by depth (ms): " + " ".join(f"{1e3 * t:.3f}" for t in r.per_depth_s))
        for t, other in r.ranking[1:]:
            print(f"  next best {1e3 * t:.3f} ms: " + ", ".join(f"[{a},{b})" for a, b in other))
    tiers = [{"name": n, "segments": f"{a}-{b - 1}"} for n, (a, b) in zip(names, bounds) if b > a]
    empty = [n for n, (a, b) in zip(names, bounds) if b <= a]
    if empty:
        same = len({(s.macs_per_s, s.overhead_s, tuple(s.segment_s or ())) for s in speeds}) == 1
        why = ("tiers of the same speed, as on one machine, never gain from a split: a hop only adds its link"
               if same else "the split of least expected latency gives them no segments: what they would save "
               "costs more in links")
        print(f"left out of the plan (no segments): {', '.join(empty)} ({why})")
    if batching:
        cores = args.cores if args.cores is not None else float(os.cpu_count() or 1)
        props, lines = propose_serving(m, bounds, speeds, depth, cores=cores, concurrency=args.concurrency,
                                       rate=args.rate, samples_per_request=args.samples_per_request,
                                       batch_cap=args.batch_cap,
                                       request_overhead_s=args.request_overhead_ms / 1000.0,
                                       front_s=args.front_ms / 1000.0, with_front=args.with_front)
        load = (f"{args.concurrency} concurrent clients" if args.concurrency is not None
                else f"{args.rate:g} requests/s")
        print(f"batching and replicas for {load} of {args.samples_per_request} sample(s) on {cores:g} cores:")
        by_name = {p.name: p for p in props}
        for t in tiers:
            p = by_name[t["name"]]
            t.update(p.options())
            print(f"  {p.name}: max_batch {p.max_batch}, batch_wait_ms {p.batch_wait_ms:g}, replicas {p.replicas}, "
                  f"num_cpus {p.num_cpus:g}" + (", with the front" if p.with_front else ""))
            for why in p.reasons:
                print(f"    - {why}")
        for line in lines:
            print(f"  {line}")
    elif args.cores is not None or args.samples_per_request != 1 or args.front_ms:
        raise ValueError("--cores, --samples-per-request and --front-ms describe the load for batching: give "
                         "--concurrency or --rate too")
    if args.with_front and tiers:
        tiers[0]["with_front"] = True
    if args.out:
        from ..io import dump_yaml

        # a plan names its export relative to itself (TierPlan.load reads it so), wherever it is written
        model = os.path.relpath(os.path.abspath(args.export_dir), os.path.dirname(os.path.abspath(args.out)))
        plan = {"model": model, "tiers": tiers, "float16": args.float16}
        with open(writable_text_file(args.out, "a plan"), "w") as f:
            f.write(dump_yaml(plan))
        print(f"wrote {args.out}")
    return 0


def _main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m eenn.serve.cli``) until the main ``eenn`` command wires these in."""
    parser = argparse.ArgumentParser(prog="eenn")
    add_parsers(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, KeyError, OSError, RuntimeError) as e:  # as the main command (eenn.cli)
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"eenn: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_main())
