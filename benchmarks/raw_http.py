"""A minimal HTTP/1.1 client on asyncio streams, for load generators that must cost little CPU.

httpx spends about a millisecond of client CPU per request; on a 2-core machine that shares its
cores with the server, that makes the load generator, not the server, the bottleneck
(docs/benchmarks_load.md). This client writes a GET by hand on a keep-alive connection and
reads the answer by its Content-Length: a few tens of microseconds per request. It speaks only
what the benchmarks need (no chunked bodies, no redirects, no TLS).
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

__all__ = ["RawConnection"]


class RawConnection:
    """One keep-alive HTTP/1.1 connection to ``url``'s host and port.

    Example:
        >>> async def fetch(url: str) -> bytes:  # doctest: +SKIP
        ...     async with RawConnection(url) as c:
        ...         status, headers, body = await c.get("/healthz")
        ...         return body
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"RawConnection speaks plain http only, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> RawConnection:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection."""
        if self._writer is not None:
            self._writer.close()

    async def get(
        self, target: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body) of ``GET target``."""
        assert self._reader is not None and self._writer is not None, "use `async with`"
        lines = [f"GET {target} HTTP/1.1", f"Host: {self.host}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *fields = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        answer = {}
        for field in fields:
            if field:
                key, _, value = field.partition(":")
                answer[key.strip().lower()] = value.strip()
        if "chunked" in answer.get("transfer-encoding", ""):
            raise ValueError("RawConnection reads Content-Length bodies only")
        body = await self._reader.readexactly(int(answer.get("content-length", "0")))
        return status, answer, body
