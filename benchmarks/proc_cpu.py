"""CPU per process while something else runs: every ``--every`` seconds, the cores each process
used since the last reading (from ``/proc/<pid>/stat``, user + system time), the busiest first.
Linux only. Beside a serving benchmark it shows where a request's CPU goes (Ray Serve's proxy,
the ingress, each tier's replica, the load generator)::

    python benchmarks/proc_cpu.py --seconds 170 &
    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --modes ray --clients "" --batch-clients 32 --no-split --seconds 16 --rounds 0

Each line: the time, the cores used in all, then ``name[pid] cores`` for the ``--top`` busiest.
Divide a process's cores by the requests/s of the same interval for its CPU time per request.
"""
import argparse
import os
import time


def cpu_times(cmdline: bool = False) -> dict[int, tuple[str, int]]:
    """``{pid: (name, user + system clock ticks)}`` for every process readable now; with
    ``cmdline`` the name is the command line (Ray's replicas name their deployment there)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            cmd = ""
            if cmdline:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone since the listing, or not ours to read
            continue
        name = cmd or stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on
        out[int(entry)] = (name, int(fields[11]) + int(fields[12]))  # utime, stime
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="how long to watch")
    p.add_argument("--every", type=float, default=4.0, help="seconds between readings")
    p.add_argument("--top", type=int, default=9, help="processes per line")
    a = p.parse_args()
    if not os.path.isdir("/proc/self"):
        raise SystemExit("proc_cpu.py reads /proc: Linux only")
    hz = os.sysconf("SC_CLK_TCK")
    end = time.monotonic() + a.seconds
    prev, t_prev = cpu_times(), time.monotonic()
    while time.monotonic() < end:
        time.sleep(a.every)
        cur, t = cpu_times(), time.monotonic()
        used = sorted(((ticks - prev[pid][1]) / hz / (t - t_prev), pid, name)
                      for pid, (name, ticks) in cur.items() if pid in prev and ticks > prev[pid][1])[::-1]
        print(time.strftime("%H:%M:%S"), f"{sum(u for u, _, _ in used):.2f} cores:",
              "; ".join(f"{name}[{pid}] {u:.2f}" for u, pid, name in used[:a.top]), flush=True)
        prev, t_prev = cur, t


if __name__ == "__main__":
    main()
