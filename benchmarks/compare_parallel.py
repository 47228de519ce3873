"""Run every method of a compare file in its own process at once (they share the machine: on a
GPU, several small trainings fill it better than one), then assemble the side-by-side tables
with one final ``eenn compare`` (which finds every method finished and only reports).

    python benchmarks/compare_parallel.py --config configs/fmnist_resnet18.yaml
    python benchmarks/compare_parallel.py --config configs/fmnist_resnet18.yaml --jobs 4 --set train.epochs=1

Each method's output goes to ``<out>/<method>.log``; the exit status is non-zero if any failed.
"""
import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from eenn.compare import _slug, load_compare


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--jobs", type=int, default=0, help="methods at once (default: all)")
    p.add_argument("--set", action="append", default=[], help="override, as for eenn compare --set")
    p.add_argument("--out", default=None)
    p.add_argument("--methods", default=None, help="comma-separated labels (default: every method of the file)")
    a = p.parse_args()
    only = [m.strip() for m in a.methods.split(",")] if a.methods else None
    base, methods = load_compare(a.config, a.set, only)
    out = Path(a.out or base.train.out_dir or "runs/compare")
    out.mkdir(parents=True, exist_ok=True)
    common = [sys.executable, "-m", "eenn", "compare", "--config", a.config, "--out", str(out)]
    for s in a.set:
        common += ["--set", s]

    def run(label: str) -> tuple[str, int, float]:
        t0 = time.perf_counter()
        with open(out / f"{_slug(label)}.log", "w") as log:
            rc = subprocess.call(common + ["--methods", label], stdout=log, stderr=subprocess.STDOUT)
        return label, rc, time.perf_counter() - t0

    with ThreadPoolExecutor(a.jobs or len(methods)) as pool:
        results = list(pool.map(run, methods))
    for label, rc, secs in results:
        print(f"{label}: exit {rc} in {secs:.0f} s (log {out / (_slug(label) + '.log')})", flush=True)
    if any(rc for _, rc, _ in results):
        return 1
    return subprocess.call(common + (["--methods", a.methods] if a.methods else []))


if __name__ == "__main__":
    sys.exit(main())
