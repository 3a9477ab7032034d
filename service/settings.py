"""Service settings from the environment (prefix ``SAELECT_``), e.g. ``SAELECT_API_TOKEN``.

List values are JSON in the environment: ``SAELECT_ALLOWED_ROOTS='["/data", "s3://bucket/ds"]'``.
"""

from __future__ import annotations

import ipaddress
import os

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATASET_ROOT = "/usr/share/datasets"


def store_data_dir(store: str) -> str:
    """Where datasets prepared for a store live: ``{store}/data`` (absolute for local paths)."""
    if "://" in store:
        return store.rstrip("/") + "/data"
    return os.path.join(os.path.abspath(store), "data")


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
    """Store root: a local directory or a pyarrow filesystem URI (DESIGN 7)."""
    allowed_roots: list[str] = Field(default_factory=list)
    """Dataset roots a job's URI must lie under. Empty means the defaults: the current directory,
    /usr/share/datasets and the store's data dir ``{store}/data``."""
    ray_address: str | None = None
    """Ray cluster address; None starts a private local Ray."""
    api_token: SecretStr | None = None
    """Bearer token required on every /v1 route when set (/healthz, /metrics, /docs stay open)."""
    insecure: bool = False
    """Allow binding a non-loopback address without a token."""
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest accepted request body in bytes; larger bodies get 413."""
    allowed_modules: list[str] = Field(default_factory=list)
    """Import paths (``pkg.mod:factory`` or a module prefix ``pkg.mod``) a ``module`` feature
    extractor may load; empty refuses every ``module`` feature."""

    @field_validator("api_token")
    @classmethod
    def _empty_token_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        return None if v is None or not v.get_secret_value() else v

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
