"""A closed-loop HTTP load generator for ``benchmarks/serve_load.py``: ``clients`` keep-alive
connections, each sending its next ``.npy`` request as soon as it has the answer, in a process of
their own (so that they do not share the server's interpreter); the answers are checked against
the engine's and summed up as requests/s, samples/s, latency percentiles, failures and the share
of samples past each tier."""
from __future__ import annotations

import asyncio
import io
import json
import math
import multiprocessing as mp
import time

import numpy as np

__all__ = ["run_load"]


async def _request(reader, writer, head: bytes, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 keep-alive POST on an open connection: ``(status, body)``."""
    writer.write(head + body)
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed")
    status = int(status_line.split()[1])
    length, chunked = None, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        k = k.strip().lower()
        if k == "content-length":
            length = int(v)
        elif k == "transfer-encoding" and "chunked" in v.lower():
            chunked = True
    if chunked:
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return status, b"".join(parts)
    return status, await reader.readexactly(length or 0)


async def _closed_loop(host: str, port: int, bodies: list[bytes], clients: int, seconds: float):
    """``clients`` connections, each sending the next body as soon as it has the answer."""
    deadline = time.perf_counter() + seconds
    rows: list[tuple[int, int, bytes, float]] = []  # (body index, status, answer, seconds)
    counter = [0]

    async def client(c: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        while time.perf_counter() < deadline:
            k = counter[0] % len(bodies)
            counter[0] += 1
            head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-npy\r\n"
                    f"Content-Length: {len(bodies[k])}\r\n\r\n").encode()
            t0 = time.perf_counter()
            try:
                status, answer = await _request(reader, writer, head, bodies[k])
            except Exception as e:  # noqa: BLE001 - a failed valid request, counted
                status, answer = 0, repr(e).encode()
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
            rows.append((k, status, answer, time.perf_counter() - t0))
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return rows, time.perf_counter() - t0


def _load_process(url: str, inputs: np.ndarray, per_request: int, clients: int, seconds: float, conn) -> None:
    """In a child process: run the closed loop and send back the parsed answers."""
    host, port = url.removeprefix("http://").split(":")
    bodies = []
    for i in range(0, len(inputs) - per_request + 1, per_request):
        buf = io.BytesIO()
        np.save(buf, inputs[i:i + per_request] if per_request > 1 else inputs[i])
        bodies.append(buf.getvalue())
    rows, wall = asyncio.run(_closed_loop(host, int(port), bodies, clients, seconds))
    out = []
    for k, status, answer, dt in rows:
        rec = {"k": k, "status": status, "s": dt}
        if status == 200:
            a = json.loads(answer)
            preds = a["predictions"] if "predictions" in a else [a]
            rec["cls"] = [p["class"] for p in preds]
            rec["exit"] = [p["exit"] for p in preds]
            rec["degraded"] = sum(bool(p["degraded"]) for p in preds)
        else:
            rec["error"] = answer[:300].decode("utf-8", "replace")
        out.append(rec)
    conn.send((out, wall))
    conn.close()


def run_load(url, inputs, expected, *, per_request, clients, seconds, stops=(1, 3)):
    """The figures of one closed-loop run: requests/s, samples/s, latency, failures, agreement;
    ``stops``: the first exit beyond the device tier and beyond the edge tier."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_load_process, args=(url, inputs, per_request, clients, seconds, child))
    proc.start()
    child.close()
    deadline = time.monotonic() + seconds + 300
    while not parent.poll(1.0):  # the child's answer, unless it died or hangs
        if not proc.is_alive() or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the load generator failed (exit code {proc.exitcode})")
    rows, wall = parent.recv()
    proc.join()
    for r in rows:  # an answer short of the samples sent is a failure, not fewer samples
        if r["status"] == 200 and not len(r["cls"]) == len(r["exit"]) == per_request:
            r["status"], r["error"] = -1, f"answered {len(r['cls'])} of the {per_request} samples sent"
    ok = [r for r in rows if r["status"] == 200]
    lat = sorted(r["s"] for r in rows) or [float("nan")]
    differ = samples = 0
    exits = []
    for r in ok:
        base = r["k"] * per_request
        for j, (c, e) in enumerate(zip(r["cls"], r["exit"])):
            differ += (c, e) != expected[base + j]
        samples += len(r["cls"])
        exits += r["exit"]
    exits = np.asarray(exits)
    return {"clients": clients, "per_request": per_request, "requests": len(rows), "seconds": wall,
            "rps": len(ok) / wall, "sps": samples / wall, "p50_ms": 1e3 * lat[len(lat) // 2],
            "p99_ms": 1e3 * lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)],
            "failed": len(rows) - len(ok), "differ": int(differ), "degraded": sum(r["degraded"] for r in ok),
            "past_device": float((exits >= stops[0]).mean()) if len(exits) else float("nan"),
            "past_edge": float((exits >= stops[1]).mean()) if len(exits) else float("nan"),
            "errors": sorted({r.get("error", "")[:120] for r in rows if r["status"] != 200})[:3]}
