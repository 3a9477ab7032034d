"""Load benchmark: many concurrent ranks against the real `saelect serve` on loopback.

Starts `saelect serve` (embedded Ray, the SelectionActor, uvicorn) on a fresh store, creates
``rs2`` jobs (no scoring: ready in seconds) and lets W ranks fetch their binary indices of every
epoch. Each rank is an ``httpx.AsyncClient`` with its own connection; the ranks are spread over
several client processes (asyncio in each) so that one client process is not the bottleneck.
Per level a fresh job: the "cold" pass fetches epochs 0..E-1 as they are computed (the first
request of an epoch computes it, the others wait on it), the "warm" pass fetches the same epochs
again (already computed: the serving path alone). A separate process polls ``/healthz`` every
50 ms throughout. Reported: requests/s, p50/p99/max latency, errors, /healthz latency, epochs
computed (``saelect_epochs_computed_total`` from /metrics, before and after), CPU seconds of the
client processes and of the server's process tree (psutil), and the load average.

Usage:
    .venv/bin/python benchmarks/load.py [--quick] [--out docs/benchmarks_load.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from load_report import report, summarize_profile, write_page  # noqa: E402

RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


@dataclass
class Level:
    """One load level: ``ranks`` ranks fetching ``epochs`` epochs of a job over ``rows`` rows."""

    name: str
    ranks: int
    epochs: int
    rows: int
    ratio: float


@dataclass
class Result:
    """Figures of one pass (cold or warm) of one level."""

    level: Level
    phase: str
    seconds: float
    latencies_s: np.ndarray
    errors: int
    error_kinds: dict[str, int]
    health_s: np.ndarray
    client_cpu_s: float
    server_cpu_s: float
    actor_cpu_s: float
    epochs_computed: float
    load_avg: tuple[float, float, float]
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The figures as one table row (milliseconds)."""
        lat = self.latencies_s * 1e3 if self.latencies_s.size else np.zeros(1)
        hz = self.health_s * 1e3 if self.health_s.size else np.full(1, np.nan)
        return {
            "level": self.level.name,
            "phase": self.phase,
            "requests": int(self.latencies_s.size + self.errors),
            "req_s": (self.latencies_s.size + self.errors) / self.seconds,
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "max_ms": float(lat.max()),
            "errors": self.errors,
            "healthz_p50_ms": float(np.percentile(hz, 50)),
            "healthz_p99_ms": float(np.percentile(hz, 99)),
            "epochs_computed": self.epochs_computed,
            "client_cpu_s": self.client_cpu_s,
            "server_cpu_s": self.server_cpu_s,
            "actor_cpu_s": self.actor_cpu_s,
            "actor_ms_per_req": 1e3
            * self.actor_cpu_s
            / max(1, self.latencies_s.size + self.errors),
            "load_avg_1m": self.load_avg[0],
            "error_kinds": self.error_kinds,
        }


# -- the client side ------------------------------------------------------------------------
class _HttpxConnection:
    """An ``httpx.AsyncClient`` behind ``raw_http.RawConnection``'s ``get`` and ``aclose``."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def get(self, target: str, headers: dict[str, str]) -> tuple[int, Any, bytes]:
        r = await self.client.get(target, headers=headers)
        return r.status_code, r.headers, r.content

    async def aclose(self) -> None:
        await self.client.aclose()


async def _rank(http: Any, job: str, rank: int, world: int, epochs: int) -> list[Any]:
    """One rank on its own open connection (``_HttpxConnection`` or ``RawConnection``):
    (epoch, seconds, error or None) per fetch; every failure is counted, none stops the rank."""
    out: list[Any] = []
    target = f"/v1/jobs/{job}/epochs/{{}}/indices?rank={rank}&world_size={world}"
    try:
        for t in range(epochs):
            t0 = time.perf_counter()
            try:
                status, headers, body = await http.get(
                    target.format(t), {"Accept": "application/octet-stream"}
                )
                dt = time.perf_counter() - t0
                if status != 200:
                    out.append((t, dt, f"http_{status}"))
                elif len(body) != 8 * int(headers["x-saelect-count"]):
                    out.append((t, dt, "short_body"))
                else:
                    out.append((t, dt, None))
            except Exception as exc:
                out.append((t, time.perf_counter() - t0, type(exc).__name__))
    finally:
        await http.aclose()
    return out


CLIENTS = ("httpx", "raw")
"""Load clients: ``httpx`` (an ``httpx.AsyncClient`` per rank, what a trainer would use) and
``raw`` (``raw_http.RawConnection``: the server's figures without the client's CPU)."""


def _client_proc(
    url: str,
    job: str,
    ranks: list[int],
    world: int,
    epochs: int,
    barrier: Any,
    results: Any,
    kind: str = "httpx",
) -> None:
    """A client process: one client (one connection) per rank, of ``kind`` (``CLIENTS``), made
    before the start, then every rank at once; puts ``{"fetches", "cpu_s"}`` on ``results``."""
    import ssl

    import httpx

    tls = ssl.create_default_context()  # one context for all clients (plain HTTP never uses it)

    async def run() -> tuple[list[list[Any]], float]:
        # every rank connects and makes one request (/healthz) before the start: the passes
        # time the fetches on open connections, not the server accepting W new ones at once
        if kind == "raw":
            from raw_http import RawConnection

            clients: list[Any] = [await RawConnection(url).__aenter__() for _ in ranks]
        else:
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            clients = [
                _HttpxConnection(
                    httpx.AsyncClient(base_url=url, limits=limits, timeout=600, verify=tls)
                )
                for _ in ranks
            ]
        for c in clients:
            status, _, _ = await c.get("/healthz", {})
            if status != 200:
                raise RuntimeError(f"/healthz answered {status} before the start")
        await asyncio.to_thread(barrier.wait)
        cpu0 = time.process_time()
        per_rank = await asyncio.gather(
            *(_rank(c, job, r, world, epochs) for c, r in zip(clients, ranks, strict=True))
        )
        return per_rank, time.process_time() - cpu0

    per_rank, cpu_s = asyncio.run(run())
    results.put({"fetches": [f for rank in per_rank for f in rank], "cpu_s": cpu_s})


def _health_proc(url: str, stop: Any, conn: Any) -> None:
    """Poll /healthz every 50 ms until ``stop`` is set; send the latencies back."""
    import httpx

    lat: list[float] = []
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                http.get("/healthz").raise_for_status()
                lat.append(time.perf_counter() - t0)
            except Exception:
                lat.append(float("inf"))
            time.sleep(0.05)
    conn.send(lat)


# -- the server side ------------------------------------------------------------------------
def _tree_cpu(pid: int) -> dict[int, tuple[float, str]]:
    """``pid -> (user + system CPU seconds, name)`` over ``pid`` and all its descendants."""
    import psutil

    out: dict[int, tuple[float, str]] = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = (t.user + t.system, " ".join(p.cmdline()[:2]) or p.name())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def _cpu_delta(before: dict[int, tuple[float, str]], after: dict[int, tuple[float, str]]) -> float:
    return sum(t - before.get(pid, (0.0, ""))[0] for pid, (t, _) in after.items())


def _actor_cpu(snapshot: dict[int, tuple[float, str]]) -> float:
    return sum(t for t, name in snapshot.values() if "SelectionActor" in name)


def _start_profile(snapshot: dict[int, tuple[float, str]], out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the SelectionActor (its pid from ``snapshot``) into ``out`` (collapsed
    stacks, idle frames included), until SIGINT."""
    pid = next(p for p, (_, name) in snapshot.items() if "SelectionActor" in name)
    spy = Path(sys.executable).with_name("py-spy")
    cmd = [str(spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "200"]
    cmd += ["--idle", "--threads", "--nonblocking", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _epochs_computed(url: str) -> float:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(
        float(m.group(1))
        for m in re.finditer(r"^saelect_epochs_computed_total\{[^}]*\} (\S+)$", text, re.M)
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_rows(path: Path, rows: int) -> Path:
    """A Parquet file of ``rows`` rows with one int64 column ``x`` (enough for rs2)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": np.arange(rows, dtype=np.int64)}), path)
    return path


SERVING = {"fast": "true", "routes": "false"}
"""Serving modes: ``fast`` answers in-memory epochs before the routes (the default),
``routes`` sends every request through FastAPI (``SAELECT_FAST_INDICES``)."""


def start_server(work: Path, serving: str = "fast") -> tuple[subprocess.Popen[bytes], str]:
    """`saelect serve` on a free loopback port, in its own process group; waits for /healthz."""
    import httpx

    port = _free_port()
    env = {**os.environ, **RAY_ENV, "SAELECT_ALLOWED_ROOTS": json.dumps([str(work)])}
    env["SAELECT_URL_FILE"] = str(work / "url")
    env["SAELECT_FAST_INDICES"] = SERVING[serving]
    store = work / f"store-{serving}"
    cmd = [sys.executable, "-m", "saelect.service.cli", "serve", "--store", str(store)]
    cmd += ["--port", str(port)]
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"saelect serve exited: {(work / 'serve.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("saelect serve did not answer /healthz in 300 s")


def create_job(url: str, data: Path, level: Level) -> str:
    """A ready rs2 job over ``data`` for ``level``."""
    from saelect.client import SelectionClient

    spec = {
        "name": f"load-{level.name}",
        "dataset": {"uri": str(data), "feature": {"kind": "pixels", "column": "x"}},
        "policy": {"name": "rs2", "ratio": level.ratio, "epochs": level.epochs, "seed": 7},
    }
    with SelectionClient(url) as c:
        job = c.create_job(spec)["id"]
        c.wait_ready(job, timeout=600, poll=0.2)
    return job


def run_pass(
    url: str,
    server_pid: int,
    job: str,
    level: Level,
    phase: str,
    procs: int,
    profile: Path | None = None,
    client: str = "httpx",
) -> Result:
    """All ranks of ``level`` fetch every epoch once, spread over ``procs`` client processes;
    with ``profile``, py-spy samples the SelectionActor meanwhile (collapsed stacks there)."""
    ctx = mp.get_context("spawn")
    procs = max(1, min(procs, level.ranks))
    shares = [list(range(level.ranks))[i::procs] for i in range(procs)]
    barrier = ctx.Barrier(procs + 1)
    stop = ctx.Event()
    recv, send = ctx.Pipe(duplex=False)
    health = ctx.Process(target=_health_proc, args=(url, stop, send), daemon=True)
    health.start()
    computed0 = _epochs_computed(url)
    results = ctx.Queue()
    clients = [
        ctx.Process(
            target=_client_proc,
            args=(url, job, share, level.ranks, level.epochs, barrier, results, client),
            daemon=True,
        )
        for share in shares
    ]
    for c in clients:
        c.start()
    cpu0 = _tree_cpu(server_pid)
    spy = _start_profile(cpu0, profile) if profile is not None else None
    barrier.wait(timeout=300)
    t0 = time.perf_counter()
    outs = [results.get(timeout=1800) for _ in clients]
    seconds = time.perf_counter() - t0
    cpu1 = _tree_cpu(server_pid)
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        spy.wait(timeout=60)
    for c in clients:
        c.join(timeout=30)
    stop.set()
    health_s = np.asarray(recv.recv(), dtype=np.float64)
    health.join(timeout=10)
    fetches = [f for o in outs for f in o["fetches"]]
    kinds: dict[str, int] = {}
    for _, _, err in fetches:
        if err is not None:
            kinds[err] = kinds.get(err, 0) + 1
    return Result(
        level=level,
        phase=phase,
        seconds=seconds,
        latencies_s=np.asarray([dt for _, dt, err in fetches if err is None]),
        errors=sum(kinds.values()),
        error_kinds=kinds,
        health_s=health_s,
        client_cpu_s=sum(o["cpu_s"] for o in outs),
        server_cpu_s=_cpu_delta(cpu0, cpu1),
        actor_cpu_s=_actor_cpu(cpu1) - _actor_cpu(cpu0),
        epochs_computed=_epochs_computed(url) - computed0,
        load_avg=os.getloadavg(),
    )


def serve_levels(
    work: Path, serving: str, levels: list[Level], data: dict[int, Path], args: Any
) -> list[Result]:
    """Start a server in mode ``serving``, run the cold and warm pass of every level, stop it.
    Level names get `` [routes]`` for the routes-only mode."""
    results: list[Result] = []
    proc, url = start_server(work, serving)
    try:
        for level in levels:
            job = create_job(url, data[level.rows], level)
            if serving != "fast":
                level = Level(**{**level.__dict__, "name": f"{level.name} [{serving}]"})
            kinds = args.clients.split(",")
            passes = [("cold", kinds[0])] + [("warm", kind) for kind in kinds]
            for phase, kind in passes:
                aim = level.ranks == 256 or (args.quick and level.rows == levels[-1].rows)
                aim = aim and serving == args.serving.split(",")[0] and kind == kinds[-1]
                spy = Path(args.profile) if args.profile and phase == "warm" and aim else None
                label = phase if len(kinds) == 1 else f"{phase} ({kind})"
                res = run_pass(url, proc.pid, job, level, label, args.procs, spy, kind)
                results.append(res)
                print(json.dumps(res.row()), flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="16 and 64 ranks, 3 epochs, 100k rows")
    p.add_argument("--procs", type=int, default=4, help="client processes")
    p.add_argument(
        "--out", default=None, help="the page to write the results into (docs/benchmarks_load.md)"
    )
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.add_argument(
        "--serving",
        default="fast",
        help="comma-separated serving modes, each a server of its own run after the other: "
        "fast (in-memory epochs answered before the routes, the default) and routes (every "
        "request through FastAPI)",
    )
    p.add_argument(
        "--clients",
        default="httpx,raw",
        help="comma-separated load clients of the warm passes (httpx, raw); the cold pass "
        "uses the first",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="py-spy the SelectionActor during the warm pass of the 256-rank level (the last "
        "level with --quick) into this collapsed-stack file",
    )
    args = p.parse_args(argv)
    for kind in args.clients.split(","):
        if kind not in CLIENTS:
            p.error(f"--clients: unknown client {kind!r} (one of {', '.join(CLIENTS)})")
    for serving in args.serving.split(","):
        if serving not in SERVING:
            p.error(f"--serving: unknown mode {serving!r} (one of {', '.join(SERVING)})")
    if args.quick:
        levels = [Level("16 ranks", 16, 3, 60_000, 0.5), Level("64 ranks", 64, 3, 60_000, 0.5)]
        levels.append(Level("64 ranks, 100k-sample epoch", 64, 2, 100_000, 1.0))
    else:
        levels = [Level(f"{w} ranks", w, 20, 60_000, 0.5) for w in (64, 256)]
        levels.append(Level("64 ranks, 1M-sample epoch", 64, 3, 1_000_000, 1.0))
        levels.append(Level("1024 ranks", 1024, 20, 60_000, 0.5))  # last: the longest
    start = time.perf_counter()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="saelect-load-") as tmp:
        work = Path(tmp)
        data = {
            n: write_rows(work / f"rows{n}" / "data.parquet", n) for n in {x.rows for x in levels}
        }
        for serving in args.serving.split(","):
            results += serve_levels(work, serving, levels, data, args)
    cmd = "python benchmarks/load.py" + (" --quick" if args.quick else "")
    cmd += f" --procs {args.procs}"
    cmd += f" --serving {args.serving}" if args.serving != "fast" else ""
    cmd += f" --clients {args.clients}" if args.clients != "httpx,raw" else ""
    cmd += f" --profile {Path(args.profile).name}" if args.profile else ""
    cmd += f" --out {args.out}" if args.out else ""
    text = report([r.row() for r in results], cmd, time.perf_counter() - start)
    if args.profile and Path(args.profile).exists():
        rows, inclusive = summarize_profile(Path(args.profile))
        text += "\nSelectionActor, busy samples (py-spy): inclusive "
        text += ", ".join(f"`{w}` {share:.1%}" for w, share in inclusive.items())
        text += "; top leaf frames:\n\n"
        text += "\n".join(f"- {share:.1%} `{frame}`" for frame, share in rows) + "\n"
    print(text)
    if args.out:
        write_page(Path(args.out), text)
    if args.json:
        Path(args.json).write_text(json.dumps([r.row() for r in results], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
