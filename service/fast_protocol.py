"""The serving fast path at the HTTP protocol: uvicorn's httptools protocol answering a rank's
fetch of an epoch in memory as soon as its headers are parsed, without an asyncio task.

Through ASGI, uvicorn gives every request a task, a scope, a ``RequestResponseCycle`` driven by
two awaited ``send`` calls, and the app's middleware; for the fast path's answer
(`service.fast_indices`: the route's bytes for an epoch already computed) that machinery is
most of the SelectionActor's CPU per request (docs/benchmarks_load.md, "The serving path").
:func:`fast_httptools_protocol` subclasses uvicorn's ``HttpToolsProtocol`` so that a request the
fast path answers is written at once, in one ``transport.write``, with the bytes uvicorn would
write (status line, uvicorn's default headers, the route's headers, ``connection: close`` when
the connection does not stay open); everything else starts the ASGI task as before. The answer
waits for the transport instead (the ASGI task, which drains before writing) while the
transport's buffer is over its high-water mark, so a client that does not read still stops the
server from reading its requests.
"""

from __future__ import annotations

import asyncio
from typing import Any

from saelect.service.fast_indices import FastIndices
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["fast_httptools_protocol"]

STATUS_200 = b"HTTP/1.1 200 OK\r\n"


def fast_httptools_protocol(fast: FastIndices) -> type[asyncio.Protocol]:
    """uvicorn's ``HttpToolsProtocol`` with ``fast`` answering in the protocol (for
    ``uvicorn.Config(http=...)``)."""

    class FastHttpToolsProtocol(HttpToolsProtocol):
        """``HttpToolsProtocol`` answering the fast path's requests without a task."""

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            if app is not self.app or self.flow.write_paused or not self._answer_now(cycle):
                super()._start_asgi_task(cycle, app)

        def _answer_now(self, cycle: Any) -> bool:
            """Write the fast path's answer to ``cycle``'s request and complete it; False
            (nothing written) when the fast path does not answer it."""
            answer = fast.response(cycle.scope)
            if answer is None:
                return False
            headers, body = answer
            content = [STATUS_200]
            for name, value in (*self.server_state.default_headers, *headers):
                content += (name, b": ", value, b"\r\n")
            if not cycle.keep_alive:
                content.append(b"connection: close\r\n")
            content += (b"\r\n", body)
            self.transport.write(b"".join(content))
            cycle.response_started = cycle.response_complete = True  # on_body and the rest skip it
            if not cycle.keep_alive:
                self.transport.close()
            self.on_response_complete()
            return True

    return FastHttpToolsProtocol
