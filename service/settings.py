"""Service settings from the environment (prefix ``SAELECT_``), e.g. ``SAELECT_API_TOKEN``.

List values are JSON in the environment: ``SAELECT_ALLOWED_ROOTS='["/data", "s3://bucket/ds"]'``.
Where the service runs and the URL it reports are settings too (deploy/README.md): the
SelectionActor is pinned to one node (``pin_resource``, or the node of the process that starts
it), and ``advertise_url`` overrides the URL built from that node's IP.
"""

from __future__ import annotations

import ipaddress
import os
import re
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATASET_ROOT = "/usr/share/datasets"
DEFAULT_URL_FILE = "~/.saelect/url"
"""Where `saelect serve` writes the URL it serves on, and where `saelect jobs` reads it."""
_RESOURCE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$")


def store_data_dir(store: str) -> str:
    """Where datasets prepared for a store live: ``{store}/data`` (absolute for local paths)."""
    if "://" in store:
        return store.rstrip("/") + "/data"
    return os.path.join(os.path.abspath(store), "data")


def url_file_path(path: str | None = None) -> str:
    """The URL file: ``path``, else ``SAELECT_URL_FILE``, else ``~/.saelect/url`` (expanded)."""
    return os.path.expanduser(path or os.environ.get("SAELECT_URL_FILE") or DEFAULT_URL_FILE)


def is_wildcard(host: str) -> bool:
    """True for the bind-everything addresses ``0.0.0.0``, ``::`` and the empty host."""
    return host.strip("[]") in ("", "0.0.0.0", "::")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Settings of the selection service; every field reads ``SAELECT_<FIELD>`` from the env."""

    model_config = SettingsConfigDict(env_prefix="SAELECT_", frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    """Address to bind; a non-loopback address needs ``api_token`` or ``insecure``."""
    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port to bind (0 picks a free one)."""
    store: str = "./.saelect/store"
    """Store root: a local directory or a pyarrow filesystem URI (docs/reliability.md,
    Persistence)."""
    allowed_roots: list[str] = Field(default_factory=list)
    """Dataset roots a job's URI must lie under. Empty means the defaults: the current directory,
    /usr/share/datasets and the store's data dir ``{store}/data``."""
    ray_address: str | None = None
    """Ray cluster address; None starts a private local Ray."""
    api_token: SecretStr | None = None
    """Bearer token required, when set, on every /v1 route, and on /metrics and /docs unless
    ``metrics_open`` / ``docs_open``; /healthz stays open."""
    insecure: bool = False
    """Allow binding a non-loopback address without a token."""
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest accepted request body in bytes; larger bodies get 413."""
    allowed_modules: list[str] = Field(default_factory=list)
    """Import paths (``pkg.mod:factory`` or a module prefix ``pkg.mod``) a ``module`` feature
    extractor may load; empty refuses every ``module`` feature."""
    advertise_url: str | None = None
    """The URL clients are told to use (printed, in ``/healthz``, in the URL file), e.g. a load
    balancer's ``https://saelect.example.com``. None: ``http://<node IP>:<port>`` of the node the
    SelectionActor runs on (the bind host itself when it is neither loopback nor a wildcard)."""
    pin_resource: str | None = None
    """A custom Ray resource that marks the node the SelectionActor must run on (the node was
    started with ``ray start --resources='{"<name>": 1}'``); the actor asks for 1 of it, so its
    restarts land on that node again. None: pinned to the node of the process that starts the
    service (``NodeAffinitySchedulingStrategy``, not soft)."""
    start_timeout_s: float = Field(default=600.0, gt=0)
    """Seconds `start_service` waits for the SelectionActor to listen: a cold worker (a fresh
    runtime environment, the first import of torch) and the resume of every stored job count."""
    url_file: str | None = None
    """Where `saelect serve` writes the advertised URL (None: ``SAELECT_URL_FILE`` or
    ``~/.saelect/url``); `saelect jobs` reads it as its default ``--url``."""
    metrics_open: bool = False
    """Serve ``/metrics`` without the token (a scraper that cannot send a bearer token); by
    default it needs the token like ``/v1`` (when a token is set). ``/healthz`` is always open."""
    docs_open: bool = False
    """Serve ``/docs``, ``/redoc`` and ``/openapi.json`` without the token; by default they need
    it (when a token is set), which a browser opening ``/docs`` cannot send."""
    max_world_size: int = Field(default=65536, ge=1)
    """Largest ``world_size`` a request may ask for; beyond it 400 ``invalid_request``."""
    max_epochs: int = Field(default=100_000, ge=1)
    """Largest ``policy.epochs`` of a new job; beyond it 400 ``invalid_request``."""
    max_feedback_batch: int = Field(default=4 * 1024 * 1024, ge=1)
    """Most samples in one feedback post; beyond it 413 ``payload_too_large``."""
    max_jobs: int = Field(default=256, ge=1)
    """Most live jobs (any phase but ``failed``); creating one more is 429 ``too_many_jobs``
    until one is deleted."""
    fast_indices: bool = True
    """Answer a binary fetch of an epoch already in memory before FastAPI's routing
    (``service.fast_indices``: same bytes and headers, a fraction of the CPU per request);
    ``false`` sends every request through the routes (the load benchmark compares both)."""
    tls_cert: str | None = None
    """PEM certificate chain to serve HTTPS with (with ``tls_key``); None serves plain HTTP.
    The files are read on the node the SelectionActor runs on."""
    tls_key: str | None = None
    """PEM private key of ``tls_cert``."""

    @field_validator("api_token")
    @classmethod
    def _empty_token_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        return None if v is None or not v.get_secret_value() else v

    @field_validator(
        "advertise_url", "pin_resource", "url_file", "tls_cert", "tls_key", mode="before"
    )
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return None if v is None or not str(v).strip() else str(v).strip()

    @field_validator("advertise_url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"advertise_url must be an http(s) URL with a host, got {v!r}")
        return v.rstrip("/")

    @field_validator("pin_resource")
    @classmethod
    def _check_resource(cls, v: str | None) -> str | None:
        if v is not None and not _RESOURCE_NAME.match(v):
            raise ValueError(f"pin_resource must be a Ray resource name, got {v!r}")
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        return self

    @model_validator(mode="after")
    def _default_roots(self) -> Settings:
        if not self.allowed_roots:
            roots = [os.getcwd(), DEFAULT_DATASET_ROOT, store_data_dir(self.store)]
            object.__setattr__(self, "allowed_roots", roots)
        return self

    @property
    def data_dir(self) -> str:
        """The store's data dir, ``{store}/data``: an allowed dataset root by default."""
        return store_data_dir(self.store)

    @property
    def url_path(self) -> str:
        """The URL file's path (``url_file``, ``SAELECT_URL_FILE`` or ``~/.saelect/url``)."""
        return url_file_path(self.url_file)

    def public_url(self, port: int, node_ip: str | None = None) -> str:
        """The URL to report for a server bound to ``host:port`` on a node with IP ``node_ip``.

        ``advertise_url`` when set; otherwise the bind host, except that a wildcard bind
        (``0.0.0.0``, ``::``) reports ``node_ip`` (loopback when unknown); ``https`` when the
        service has ``tls_cert``.

        Example:
            >>> Settings(host="0.0.0.0", insecure=True).public_url(8000, "10.0.0.7")
            'http://10.0.0.7:8000'
        """
        if self.advertise_url:
            return self.advertise_url
        host = self.host
        if is_wildcard(host):
            host = node_ip or "127.0.0.1"
        host = host.strip("[]")
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"

    @property
    def token(self) -> str | None:
        """The API token in clear, or None when auth is off."""
        return self.api_token.get_secret_value() if self.api_token else None

    def check_bind(self) -> None:
        """Refuse to serve a non-loopback address without a token unless ``insecure``.

        Raises
        ------
        ValueError
            When ``host`` is not loopback, no ``api_token`` is set and ``insecure`` is False.
        """
        if not is_loopback(self.host) and self.api_token is None and not self.insecure:
            raise ValueError(
                f"refusing to bind non-loopback host {self.host!r} without an API token: "
                "set SAELECT_API_TOKEN, or pass --insecure to serve without authentication"
            )
