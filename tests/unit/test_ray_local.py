"""`service.ray_local`: the embedded Ray's environment is forced, also after ``import ray``.

Runs in a subprocess (no Ray is started): the pytest process keeps its own Ray settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json, os, sys
from saelect.service.ray_local import prepare_embedded_env

before = "ray" in sys.modules
prepare_embedded_env()
first = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                                        "RAY_USAGE_STATS_ENABLED")}
os.environ["RAY_AUTH_MODE"] = "disabled"  # a caller that turns it off again, then imports ray
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
import ray
from ray._private import ray_constants
from ray._private.authentication.authentication_utils import is_token_auth_enabled
cached = [ray_constants.ENABLE_RAY_CLUSTER, is_token_auth_enabled()]
prepare_embedded_env()
after = [ray_constants.ENABLE_RAY_CLUSTER, is_token_auth_enabled()]
print(json.dumps({"before": before, "first": first, "cached": cached, "after": after}))
"""


def test_the_embedded_environment_is_forced_before_and_after_import_ray() -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "1"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["before"] is False  # service.ray_local itself does not import ray
    assert got["first"] == {
        "RAY_AUTH_MODE": "token",  # forced over the caller's "disabled"
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "1",  # a default only: the caller's value stays
    }
    assert got["cached"] == [True, False]  # what Ray read at import: cluster mode, no tokens
    assert got["after"] == [False, True]  # corrected before any ray.init
    assert "RAY_AUTH_MODE=disabled ignored" in out.stderr
