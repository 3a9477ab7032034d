"""Serving cost: the server's CPU per request for a rank's fetch of an epoch already computed.

The load benchmark (benchmarks/load.py) measures latency under many ranks, but on this 2-core
machine its clients and the server share the cores, so its latencies mix both. This script
isolates the server: the real app (``service.app.create_app``) under uvicorn in a child process,
over an in-memory backend whose epochs are all computed (seeded permutations of 60,000 rows,
r = 0.5, as load.py's rank levels), and a raw asyncio client (hand-written HTTP/1.1 GETs on
``--connections`` keep-alive connections, a few microseconds of client CPU per request) that
checks every answer's bytes. For each HTTP parser (uvicorn's ``h11``, pure Python, and
``httptools``, C), each event loop (``asyncio``, ``uvloop``) and each serving mode (``routes``:
every request through FastAPI; ``fast``: the in-memory fast path of ``service.fast_indices`` in
front of the app; ``protocol``: the same fast path inside uvicorn's httptools protocol,
``service.fast_protocol``, what the service runs) it reports the server process's CPU
microseconds per request (psutil, user + system), the requests per second, and the client-side
latency percentiles at that concurrency.

By Little's law, a server with one core answering a closed loop of C in-flight requests has a
mean latency of about C times its CPU per request: the last column is that bound at 256 ranks,
the figure to compare with the target of a 50 ms p99 (docs/benchmarks_load.md discusses it).

Usage:
    .venv/bin/python benchmarks/serving_cost.py [--requests 20000] [--connections 64]
        [--out docs/benchmarks_load.md]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from doc_block import replace_marked  # noqa: E402
from raw_http import RawConnection  # noqa: E402
from serving_bench import MemoryBackend, free_port  # noqa: E402

ROWS = 60_000
RATIO = 0.5
EPOCHS = 4
JOB = "load"
BEGIN = "<!-- serving_cost.py results: begin -->"
END = "<!-- serving_cost.py results: end -->"


class ComputedBackend(MemoryBackend):
    """``MemoryBackend`` with one job whose epochs are all computed (and so in memory)."""

    def __init__(self) -> None:
        super().__init__(())
        m = round(RATIO * ROWS)
        self.orders = {JOB: [epoch_order(t)[:m] for t in range(EPOCHS)]}
        from saelect.service.backend import JobStatus, Progress

        self.status = {JOB: JobStatus(JOB, JOB, "ready", Progress(1, 1), ROWS, EPOCHS)}

    def ready_epoch_indices(
        self, job_id: str, epoch: int, rank: int, world_size: int
    ) -> np.ndarray | None:
        from saelect.service.selection.partition import rank_indices

        orders = self.orders.get(job_id)
        if orders is None or not 0 <= epoch < len(orders):
            return None
        return rank_indices(orders[epoch], rank, world_size)


def epoch_order(t: int) -> np.ndarray:
    """int64 (ROWS,) epoch t's seeded permutation."""
    return np.random.default_rng([7, t]).permutation(ROWS).astype(np.int64)


MODES = ("routes", "fast", "protocol")
"""Serving modes: every request through FastAPI; the fast path in front of the app (ASGI); the
fast path in uvicorn's httptools protocol (`service.fast_protocol`, the service's default)."""


def serve(port: int, http: str, mode: str, loop: str) -> None:
    """Child process: uvicorn (parser ``http``, event loop ``loop``: ``asyncio`` or ``uvloop``)
    with the real app over a ComputedBackend, configured as the service configures it
    (``service.server.server_config``), serving in ``mode`` (one of MODES)."""
    import uvicorn
    from saelect.service.app import create_app
    from saelect.service.server import server_config
    from saelect.service.settings import Settings

    settings = Settings(
        allowed_roots=[str(ROOT)], fast_indices=mode != "routes", host="127.0.0.1", port=port
    )
    app = create_app(ComputedBackend(), settings)
    overrides: dict[str, Any] = {"loop": loop}
    if mode != "protocol":
        overrides["http"] = http  # the plain protocol: the fast path, if on, in the app
    elif http != "httptools":
        raise ValueError("the protocol mode needs httptools")
    uvicorn.Server(server_config(app, settings, **overrides)).run()


async def _connection(
    port: int, requests: list[tuple[int, int]], world: int, latencies: list[float]
) -> dict[tuple[int, int], bytes]:
    """One keep-alive connection sending ``requests`` ((epoch, rank) each) one after another."""
    bodies: dict[tuple[int, int], bytes] = {}
    async with RawConnection(f"http://127.0.0.1:{port}") as http:
        for epoch, rank in requests:
            target = f"/v1/jobs/{JOB}/epochs/{epoch}/indices?rank={rank}&world_size={world}"
            t0 = time.perf_counter()
            status, _, body = await http.get(target, {"Accept": "application/octet-stream"})
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                raise RuntimeError(f"answer {status} to GET {target}")
            bodies[(epoch, rank)] = body
    return bodies


async def _load(port: int, connections: int, requests: int, world: int) -> list[float]:
    """``requests`` fetches of ranks of every epoch over ``connections`` connections; checks
    every body against the partition of the seeded epoch order."""
    from saelect.service.selection.partition import rank_indices

    plan = [(t % EPOCHS, (t // EPOCHS) % world) for t in range(requests)]
    shares = [plan[i::connections] for i in range(connections)]
    latencies: list[float] = []
    parts = await asyncio.gather(*(_connection(port, s, world, latencies) for s in shares))
    m = round(RATIO * ROWS)
    orders = [epoch_order(t)[:m] for t in range(EPOCHS)]
    for part in parts:
        for (epoch, rank), body in part.items():
            want = rank_indices(orders[epoch], rank, world)
            if not np.array_equal(np.frombuffer(body, dtype="<i8"), want):
                raise AssertionError(f"wrong bytes for epoch {epoch}, rank {rank}")
    return latencies


def measure(
    http: str, mode: str, loop: str, requests: int, connections: int, world: int
) -> dict[str, Any]:
    """Start a server, warm it, then time ``requests`` fetches; the server's CPU per request."""
    import httpx
    import psutil

    port = free_port()
    proc = mp.get_context("spawn").Process(target=serve, args=(port, http, mode, loop), daemon=True)
    proc.start()
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        server = psutil.Process(proc.pid)
        asyncio.run(_load(port, connections, min(requests, 2000), world))  # warm-up
        cpu0 = sum(server.cpu_times()[:2])
        t0 = time.perf_counter()
        lat = np.asarray(asyncio.run(_load(port, connections, requests, world)))
        wall = time.perf_counter() - t0
        cpu = sum(server.cpu_times()[:2]) - cpu0
    finally:
        proc.terminate()
        proc.join(timeout=10)
    return {
        "http": http,
        "loop": loop,
        "mode": mode,
        "requests": requests,
        "server_us_per_req": 1e6 * cpu / requests,
        "req_s": requests / wall,
        "p50_ms": float(np.percentile(lat, 50)) * 1e3,
        "p99_ms": float(np.percentile(lat, 99)) * 1e3,
        "bound_256_ms": 256 * cpu / requests * 1e3,
    }


def table(rows: list[dict[str, Any]], cmd: str, connections: int) -> str:
    """The results as a Markdown block."""
    load = os.getloadavg()
    lines = [
        f"Command: `{cmd}`; {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; {connections} connections, world size 64, 30,000-index "
        f"epochs (469 indices per rank); load average at the end {load[0]:.1f}.",
        "",
        "| HTTP parser | event loop | serving | requests | server CPU us/request | req/s "
        "| p50 ms | p99 ms | 256 ranks x CPU/request, ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['http']} | {r['loop']} | {r['mode']} | {r['requests']} "
            f"| {r['server_us_per_req']:.0f} "
            f"| {r['req_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['bound_256_ms']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--http", default="h11,httptools", help="uvicorn HTTP parsers to compare")
    p.add_argument(
        "--loops",
        default="asyncio",
        help="event loops to compare, e.g. asyncio,uvloop (uvloop, not a dependency, must be "
        "installed: Ray runs async actors such as the service's on it when it is)",
    )
    p.add_argument("--out", default=None, help="the page with the results block to rewrite")
    args = p.parse_args(argv)
    rows = []
    for http in args.http.split(","):
        for loop in args.loops.split(","):
            for mode in MODES if http == "httptools" else MODES[:2]:
                row = measure(http, mode, loop, args.requests, args.connections, 64)
                print(row, flush=True)
                rows.append(row)
    cmd = f"python benchmarks/serving_cost.py --requests {args.requests} "
    cmd += f"--connections {args.connections} --http {args.http} --loops {args.loops}" + (
        f" --out {args.out}" if args.out else ""
    )
    text = table(rows, cmd, args.connections)
    print(text)
    if args.out:
        replace_marked(Path(args.out), BEGIN, END, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
