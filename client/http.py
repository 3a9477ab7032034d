"""HTTP client of the saelect service (docs/api.md). Needs only httpx and numpy.

Example:
    >>> c = SelectionClient("http://127.0.0.1:8000")                       # doctest: +SKIP
    >>> job = c.create_job(spec)                                           # doctest: +SKIP
    >>> c.wait_ready(job["id"])                                            # doctest: +SKIP
    >>> idx = c.indices(job["id"], epoch=0, rank=0, world_size=2)          # doctest: +SKIP
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
from saelect.client.errors import JobFailedError, SelectionError

RETRY_STATUSES = frozenset({502, 503, 504})
"""Gateway/unavailable answers that are retried; every other error status raises at once."""
IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE", "PUT"})
COUNT_HEADER = "X-Saelect-Count"


def _error_from(resp: httpx.Response) -> SelectionError:
    """A SelectionError carrying the server's ``{"error": {"code", "message"}}``."""
    try:
        err = resp.json()["error"]
        return SelectionError(resp.status_code, str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        text = resp.text.strip()[:500] or resp.reason_phrase
        return SelectionError(resp.status_code, f"http_{resp.status_code}", text)


def _read_array(resp: httpx.Response, dtype: str) -> np.ndarray:
    """Stream a little-endian ``dtype`` body straight into one array: (X-Saelect-Count,)."""
    item = np.dtype(dtype).itemsize
    count = resp.headers.get(COUNT_HEADER)
    if count is None or not count.isdigit():
        data = resp.read()
        if len(data) % item:
            raise SelectionError(resp.status_code, "bad_body", f"{len(data)} bytes is not {dtype}")
        return np.frombuffer(data, dtype=dtype).copy()
    out = np.empty(int(count), dtype=dtype)  # one copy: socket chunks land in place
    view = memoryview(out).cast("B")  # type: ignore[arg-type]
    pos = 0
    for chunk in resp.iter_bytes():
        end = pos + len(chunk)
        if end > view.nbytes:
            raise SelectionError(resp.status_code, "bad_body", f"more than {count} values sent")
        view[pos:end] = chunk
        pos = end
    if pos != view.nbytes:
        raise SelectionError(
            resp.status_code, "truncated", f"expected {count} values, received {pos // item}"
        )
    return out


def _read_int64(resp: httpx.Response) -> np.ndarray:
    """int64 (X-Saelect-Count,) from a binary indices body."""
    return _read_array(resp, "<i8").astype(np.int64, copy=False)


def _read_float32(resp: httpx.Response) -> np.ndarray:
    """float32 (X-Saelect-Count,) from a binary weights body."""
    return _read_array(resp, "<f4").astype(np.float32, copy=False)


def tls_context(verify: bool | str | os.PathLike[str] | ssl.SSLContext) -> bool | ssl.SSLContext:
    """httpx's ``verify``: a CA bundle path becomes an ``ssl.SSLContext`` that trusts it."""
    if isinstance(verify, bool | ssl.SSLContext):
        return verify
    path = os.fspath(verify)
    if not os.path.isfile(path):
        raise ValueError(f"verify: no CA bundle file at {path!r}")
    return ssl.create_default_context(cafile=path)


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` behind a connection error (a certificate that fails), if any."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


class SelectionClient:
    """Talks to one saelect service.

    Parameters
    ----------
    url:
        Base URL, e.g. ``http://head:8000``.
    token:
        Bearer token when the service has ``SAELECT_API_TOKEN`` set.
    timeout:
        Seconds per request (connect, read, write, pool).
    retries:
        Extra attempts after a connection error or a 502/503/504, with exponential backoff
        ``backoff * 2**attempt`` seconds (capped at ``max_backoff``).
    backoff:
        First backoff delay in seconds.
    max_backoff:
        Keyword-only. Largest single delay.
    transport:
        Keyword-only. An httpx transport (tests use ``httpx.MockTransport``).
    verify:
        Keyword-only. How an ``https://`` server's certificate is checked: True (the default)
        against the system's CAs, a path to a PEM CA bundle (a private CA, or the service's
        self-signed certificate), an ``ssl.SSLContext``, or False (no check: tests only).

    Raises
    ------
    SelectionError
        From every method, for error answers (with the server's code and message) and when
        the server stays unreachable (status 0, code ``unreachable``).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.2,
        *,
        max_backoff: float = 5.0,
        transport: httpx.BaseTransport | None = None,
        verify: bool | str | os.PathLike[str] | ssl.SSLContext = True,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if backoff < 0 or max_backoff < 0:
            raise ValueError(f"backoff must be >= 0, got {backoff}, {max_backoff}")
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep: Callable[[float], None] = time.sleep
        headers = {"User-Agent": "saelect-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.url,
            timeout=timeout,
            headers=headers,
            transport=transport,
            verify=tls_context(verify),
        )

    def __repr__(self) -> str:
        return f"SelectionClient({self.url!r})"

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> SelectionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        read: Callable[[httpx.Response], Any] | None = None,
    ) -> Any:
        """Send with retries; returns the read response, or ``read(response)`` when given
        (``read`` consumes the streamed body of a 2xx answer)."""
        retryable: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout)
        if method in IDEMPOTENT:  # the server may have dropped the connection mid-request
            retryable += (httpx.RemoteProtocolError, httpx.ReadError)
        attempt = 0
        while True:
            request = self._http.build_request(
                method, path, params=params, json=json, content=content, headers=headers
            )
            try:
                resp = self._http.send(request, stream=True)
                try:
                    if resp.status_code in RETRY_STATUSES and attempt < self.retries:
                        pass  # retry below
                    elif resp.status_code >= 400:
                        resp.read()
                        raise _error_from(resp)
                    elif read is not None:
                        return read(resp)
                    else:
                        resp.read()
                        return resp
                finally:
                    resp.close()
            except retryable as exc:
                tls = _tls_failure(exc)
                if tls is not None:  # retrying cannot fix a certificate
                    raise SelectionError(
                        0, "tls_error", f"{method} {self.url}{path}: TLS failed: {tls}"
                    ) from exc
                if attempt >= self.retries:
                    raise SelectionError(
                        0,
                        "unreachable",
                        f"{method} {self.url}{path} failed after {attempt + 1} attempts: {exc!r}",
                    ) from exc
            except httpx.TimeoutException as exc:
                raise SelectionError(0, "timeout", f"{method} {self.url}{path}: {exc!r}") from exc
            except httpx.TransportError as exc:
                raise SelectionError(0, "transport_error", f"{method} {path}: {exc!r}") from exc
            self._sleep(min(self.max_backoff, self.backoff * (2**attempt)))
            attempt += 1

    @staticmethod
    def _job(job_id: str) -> str:
        return "/v1/jobs/" + quote(str(job_id), safe="")

    # -- API ---------------------------------------------------------------------------------
    def healthz(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"status": "ok", "version": ...}``."""
        return self._request("GET", "/healthz").json()

    def create_job(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /v1/jobs``: register a job (spec as in docs/api.md); returns its status."""
        return self._request("POST", "/v1/jobs", json=dict(spec)).json()

    def jobs(self) -> list[dict[str, Any]]:
        """``GET /v1/jobs``: every job's status."""
        return list(self._request("GET", "/v1/jobs").json()["jobs"])

    def job(self, job_id: str) -> dict[str, Any]:
        """``GET /v1/jobs/{id}``: phase, progress, samples, epochs committed, error."""
        return self._request("GET", self._job(job_id)).json()

    def wait_ready(
        self,
        job_id: str,
        timeout: float = 600.0,
        poll: float = 1.0,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll the job until phase ``ready``; returns its status.

        Parameters
        ----------
        on_progress:
            Called with every status polled (``phase``, ``progress {done, total}``, ``reason``),
            the last one included, e.g. to drive a progress bar (`saelect jobs wait` does).

        Example:
            >>> c.wait_ready(job, on_progress=lambda s: print(s["phase"], s["progress"]))
            ... # doctest: +SKIP

        Raises
        ------
        JobFailedError
            When the job reaches phase ``failed`` (message = the job's error).
        TimeoutError
            When it is not ready after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            status = self.job(job_id)
            if on_progress is not None:
                on_progress(status)
            if status["phase"] == "ready":
                return status
            if status["phase"] == "failed":
                raise JobFailedError(200, "job_failed", str(status.get("error") or "job failed"))
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"job {job_id!r} not ready after {timeout}s (phase {status['phase']!r}, "
                    f"progress {status.get('progress')})"
                )
            self._sleep(poll)

    def plan(self, job_id: str, world_size: int = 1) -> dict[str, Any]:
        """``GET .../plan``: ``{"world_size", "epochs": [{"epoch","size","per_rank"}],
        "sample_fraction"}``."""
        return self._request(
            "GET", self._job(job_id) + "/plan", params={"world_size": world_size}
        ).json()

    def indices(
        self, job_id: str, epoch: int, rank: int = 0, world_size: int = 1, *, as_json: bool = False
    ) -> np.ndarray:
        """This rank's indices of ``epoch``: int64 (per_rank,). Binary transfer by default."""
        path = f"{self._job(job_id)}/epochs/{int(epoch)}/indices"
        params = {"rank": rank, "world_size": world_size}
        if as_json:
            resp = self._request("GET", path, params=params, headers={"Accept": "application/json"})
            return np.asarray(resp.json()["indices"], dtype=np.int64)
        return self._request(  # type: ignore[no-any-return]
            "GET",
            path,
            params=params,
            headers={"Accept": "application/octet-stream"},
            read=_read_int64,
        )

    def weights(self, job_id: str, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Loss weights aligned with ``indices`` of the same arguments: float32 (per_rank,);
        all 1 unless the job's policy reweights samples (infobatch)."""
        path = f"{self._job(job_id)}/epochs/{int(epoch)}/weights"
        return self._request(  # type: ignore[no-any-return]
            "GET",
            path,
            params={"rank": rank, "world_size": world_size},
            headers={"Accept": "application/octet-stream"},
            read=_read_float32,
        )

    def feedback(
        self, job_id: str, epoch: int, indices: np.ndarray, losses: np.ndarray
    ) -> dict[str, Any]:
        """Send per-sample losses of ``epoch`` (indices int (n,), losses float (n,)).

        Sent as binary: n int64 LE indices then n float32 LE losses.
        """
        idx = np.ascontiguousarray(np.asarray(indices).reshape(-1), dtype="<i8")
        val = np.ascontiguousarray(np.asarray(losses).reshape(-1), dtype="<f4")
        if idx.shape != val.shape:
            raise ValueError(f"indices and losses differ in length: {idx.shape} vs {val.shape}")
        return self._request(
            "POST",
            f"{self._job(job_id)}/epochs/{int(epoch)}/feedback",
            content=idx.tobytes() + val.tobytes(),
            headers={"Content-Type": "application/octet-stream", COUNT_HEADER: str(idx.size)},
        ).json()

    def stats(self, job_id: str, epoch: int) -> dict[str, Any]:
        """``GET .../stats``: lambda, size, coverage, usage, factor coverage of ``epoch``."""
        return self._request("GET", f"{self._job(job_id)}/epochs/{int(epoch)}/stats").json()

    def delete(self, job_id: str) -> None:
        """``DELETE /v1/jobs/{id}``: drop the job and its stored state."""
        self._request("DELETE", self._job(job_id))
