"""The embedded Ray of `saelect serve`: loopback only, Ray's token authentication on.

Whatever started the service (a plain shell, ``make``, the Python API), every socket of every
process the embedded Ray starts (GCS, raylet, dashboard agent, runtime-env agent, workers, the
driver's core worker) must listen on 127.0.0.1 only. Ray decides this from
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``: ``0`` makes the node's address the loopback address and
its daemons bind there. Ray reads the variable once, when ``ray`` is first imported, and its
daemons and workers read it again from their inherited environment; so `prepare_embedded_env`
sets it in ``os.environ`` and, when ``ray`` was already imported with another value, corrects
the constant Ray cached. ``_node_ip_address="127.0.0.1"`` alone is not enough: with it the GCS,
the raylet and every worker still listen on ``[::]`` (measured with Ray 2.60).

Token authentication (``RAY_AUTH_MODE=token``, Ray >= 2.52) is forced for the embedded Ray, even
when the caller's environment says ``disabled``: a local user must not be able to run code in it.
Ray reads the token from ``RAY_AUTH_TOKEN``, else ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token``, which ``ray.init`` creates when missing.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
EMBEDDED_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # the node address is 127.0.0.1, daemons bind it
    "RAY_AUTH_MODE": "token",  # Ray's token authentication, never off for the embedded Ray
}
"""Environment every process of the embedded Ray must see (forced, not defaults)."""
DEFAULT_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
"""Defaults the caller may override."""


def prepare_embedded_env() -> None:
    """Set `EMBEDDED_ENV` for this process and the Ray processes it starts (before ``ray.init``).

    When ``ray`` is already imported (the Python API after ``import ray``), the values Ray
    cached at import are corrected too, so the embedded Ray still binds loopback and uses tokens.
    """
    for key, value in EMBEDDED_ENV.items():
        old = os.environ.get(key)
        if old is not None and old != value:
            log.warning("%s=%s ignored: the embedded Ray always runs with %s", key, old, value)
        os.environ[key] = value
    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)
    if "ray" not in sys.modules:
        return
    from ray._private import ray_constants
    from ray._private.authentication.authentication_utils import is_token_auth_enabled
    from ray._raylet import Config  # type: ignore[attr-defined]

    ray_constants.ENABLE_RAY_CLUSTER = False  # read by services.get_node_ip_address
    if not is_token_auth_enabled():
        Config.initialize("")  # re-read RAY_AUTH_MODE (what Ray's own token set-up does)


def check_embedded() -> None:
    """Raise RuntimeError unless the connected (embedded) Ray is on loopback with tokens."""
    import ray
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    ip = ray.util.get_node_ip_address()
    if ip != LOOPBACK:
        raise RuntimeError(f"the embedded Ray node has address {ip}, not {LOOPBACK}")
    if not is_token_auth_enabled():
        raise RuntimeError("the embedded Ray runs without token authentication")
