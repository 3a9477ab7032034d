"""The load benchmark's client side: the client processes (one connection per rank, every rank
at once on asyncio), the rank loop that fetches every epoch's binary indices, and the process
that polls ``/healthz`` throughout.

Used by benchmarks/load.py (its passes start these processes); kept apart so that the runner
stays short.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


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


def client_proc(
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


def health_proc(url: str, stop: Any, conn: Any) -> None:
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
