"""The FastAPI app of the selection service, built by ``create_app(backend, settings)``.

Every error answer has the shape ``{"error": {"code": "...", "message": "..."}}``: validation
errors and malformed JSON are 400 (not FastAPI's 422), bad tokens 401, unknown jobs and epochs
out of range 404, jobs not ready and feedback to feedback-free policies 409, oversized bodies (and
feedback batches) 413, one job past the live-jobs limit 429.
A 500 in the same shape is reserved for real bugs.

Example:
    >>> app = create_app(backend, Settings())          # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from saelect.service.backend import Backend
from saelect.service.errors import PayloadTooLarge, SaelectError
from saelect.service.fast_indices import FastIndices
from saelect.service.metrics import Metrics, MetricsMiddleware
from saelect.service.routes import check_token, epochs, health, jobs, require_token_for_docs
from saelect.service.routes import metrics as metrics_route
from saelect.service.routes.health import VERSION
from saelect.service.settings import Settings
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger(__name__)

HTTP_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """``{"error": {"code", "message"}}`` with the given status."""
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _saelect_error(exc: SaelectError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(exc.status, exc.code, exc.message, headers)


def _validation_message(errors: list[Any]) -> str:
    parts = []
    for e in errors[:10]:
        loc = ".".join(str(p) for p in e.get("loc", ()))
        msg = e.get("msg", "invalid")
        ctx = e.get("ctx") or {}
        if e.get("type") == "json_invalid" and "error" in ctx:
            msg = f"{msg}: {ctx['error']}"
        parts.append(f"{loc}: {msg}" if loc else msg)
    if len(errors) > 10:
        parts.append(f"... and {len(errors) - 10} more")
    return "; ".join(parts)


METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route of ``app`` serves at the request's path, sorted (``Allow``)."""
    allowed = []
    for method in METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception to the error shape; the 500 handler only fires on real bugs."""

    @app.exception_handler(SaelectError)
    async def saelect_error(_: Request, exc: SaelectError) -> JSONResponse:
        return _saelect_error(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        malformed = any(e.get("type") == "json_invalid" for e in errors)
        code = "malformed_json" if malformed else "invalid_request"
        return error_response(400, code, _validation_message(errors))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405:  # Starlette lists the first matching route's methods only
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(app, request))}
        return error_response(exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError wraps the real error
        if isinstance(cause, SaelectError):
            return _saelect_error(cause)
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(
            500, "internal_error", f"internal server error ({type(exc).__name__})"
        )


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 for bodies above ``max_bytes``.

    Checks ``Content-Length`` up front and the streamed length of chunked bodies while
    buffering them, then replays the buffered body to the app.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Any, exc: SaelectError) -> None:
        resp = _saelect_error(exc)
        resp.headers["Connection"] = "close"
        await send(
            {"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers}
        )
        await send({"type": "http.response.body", "body": resp.body})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        if length is None and not chunked:
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
        if length is not None:
            if not length.strip().isdigit():
                await self._reject(send, PayloadTooLarge("invalid Content-Length header"))
                return
            if int(length) > self.max_bytes:
                await self._reject(send, too_large)
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._reject(send, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return dict(await receive())

        await self.app(scope, replay, send)


class TokenMiddleware:
    """Pure ASGI middleware: 401 before routing for a guarded path without the right token.

    The routes check the token too (a dependency), but FastAPI parses a request's body before
    it runs dependencies: without this, an unauthenticated POST with a malformed body would get
    400 and the parser's message instead of 401 (schemathesis found it). Guarded: ``/v1/...``,
    ``/metrics`` unless ``metrics_open``, the docs unless ``docs_open``; never ``/healthz``.
    """

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.token = settings.token
        self.guarded = set() if settings.metrics_open else {"/metrics"}
        if not settings.docs_open:
            self.guarded |= {"/docs", "/redoc", "/openapi.json"}

    def _guards(self, path: str) -> bool:
        return path == "/v1" or path.startswith("/v1/") or path in self.guarded

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.token is None or not self._guards(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = None
        for key, value in scope.get("headers") or ():
            if key == b"authorization":
                header = value.decode("latin-1")
                break
        try:
            check_token(self.token, header)
        except SaelectError as exc:
            resp = _saelect_error(exc)
            await send({"type": "http.response.start", "status": 401, "headers": resp.raw_headers})
            await send({"type": "http.response.body", "body": resp.body})
            return
        await self.app(scope, receive, send)


def install_docs(app: FastAPI) -> None:
    """``/openapi.json``, ``/docs`` (Swagger UI) and ``/redoc``, behind the token unless
    ``Settings.docs_open`` (a browser opening ``/docs`` sends no bearer token)."""
    guard = [Depends(require_token_for_docs)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=guard)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=guard)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - API")

    @app.get("/redoc", include_in_schema=False, dependencies=guard)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")


class SaelectApp(FastAPI):
    """FastAPI with the serving fast path in front: ``fast_indices`` sees each request first
    and answers a binary fetch of an epoch in memory before the middleware stack and the routes
    (token and metrics included: ``service.fast_indices``); every other request goes on as in
    FastAPI."""

    fast_indices: FastIndices | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        fast = self.fast_indices
        if fast is not None and await fast.answer(scope, send):
            return
        await super().__call__(scope, receive, send)


def create_app(backend: Backend, settings: Settings | None = None) -> FastAPI:
    """The HTTP app over ``backend``.

    Parameters
    ----------
    backend:
        Implements ``service.backend.Backend`` (the SelectionActor, or a fake in tests).
    settings:
        Auth token, body limit, allowed dataset roots and modules; defaults to ``Settings()``
        (the ``SAELECT_*`` environment).

    Returns
    -------
    FastAPI
        The routes of docs/api.md; OpenAPI UI at ``/docs`` (behind the token unless
        ``settings.docs_open``).
    """
    settings = settings if settings is not None else Settings()
    app = SaelectApp(
        title="saelect",
        version=VERSION,
        description="Dynamic data selection: per-epoch, per-rank training subsets.",
        docs_url=None,  # served by `install_docs`, behind the token unless docs_open
        redoc_url=None,
        openapi_url=None,
    )
    app.state.backend = backend
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.fast_indices = FastIndices(backend, settings, app.state.metrics)
    install_error_handlers(app)
    install_docs(app)
    for module in (health, metrics_route, jobs, epochs):
        app.include_router(module.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(TokenMiddleware, settings=settings)  # outside the body limit: 401 first
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    add_listener = getattr(backend, "add_epoch_listener", None)  # optional Backend method
    if add_listener is not None:
        add_listener(app.state.metrics.observe_epoch)
    add_feedback_listener = getattr(backend, "add_feedback_listener", None)
    if add_feedback_listener is not None:
        add_feedback_listener(app.state.metrics.observe_feedback_lag)
    return app
