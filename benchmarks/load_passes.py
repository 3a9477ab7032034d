"""One pass of the load benchmark: a load level (``Level``), the figures of a pass (``Result``)
and ``run_pass``, which spreads a level's ranks over client processes, polls ``/healthz``
meanwhile and measures requests, latencies, errors, epochs computed and CPU seconds.

Used by benchmarks/load.py; kept apart so that the runner stays short.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from load_clients import client_proc, health_proc
from load_server import actor_cpu, cpu_delta, epochs_computed_total, start_profile, tree_cpu


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
    health = ctx.Process(target=health_proc, args=(url, stop, send), daemon=True)
    health.start()
    computed0 = epochs_computed_total(url)
    results = ctx.Queue()
    clients = [
        ctx.Process(
            target=client_proc,
            args=(url, job, share, level.ranks, level.epochs, barrier, results, client),
            daemon=True,
        )
        for share in shares
    ]
    for c in clients:
        c.start()
    cpu0 = tree_cpu(server_pid)
    spy = start_profile(cpu0, profile) if profile is not None else None
    barrier.wait(timeout=300)
    t0 = time.perf_counter()
    outs = [results.get(timeout=1800) for _ in clients]
    seconds = time.perf_counter() - t0
    cpu1 = tree_cpu(server_pid)
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
        server_cpu_s=cpu_delta(cpu0, cpu1),
        actor_cpu_s=actor_cpu(cpu1) - actor_cpu(cpu0),
        epochs_computed=epochs_computed_total(url) - computed0,
        load_avg=os.getloadavg(),
    )
