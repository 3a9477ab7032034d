"""Shared schemathesis set-up: a seeded, bounded config and the retargeting of cases at real jobs.

Used by tests/unit/test_api_fuzz.py (the app over the FakeBackend) and
tests/integration/test_service_ray.py (the real service).
"""

from __future__ import annotations

import re
import zlib
from typing import Any

from saelect.service.routes import JOB_ID_PATTERN
from schemathesis.config import SchemathesisConfig

DOCUMENTED_REFUSALS = ["2XX", "400", "404", "409", "413", "429"]
"""What a schema-valid request may get: the schema cannot say that a job id is unknown, that
``rank < world_size``, that a dataset lies under the allowed roots or that a job is not ready."""


def fuzz_config(*, examples: int, seed: int = 1, coverage: bool = True) -> SchemathesisConfig:
    """Seeded, ``examples`` fuzzed cases per operation, the refusals a valid request may get."""
    return SchemathesisConfig.from_dict(
        {
            "seed": seed,
            "generation": {"max-examples": examples},
            "phases": {"coverage": {"enabled": coverage}, "stateful": {"enabled": False}},
            "checks": {"positive_data_acceptance": {"expected-statuses": DOCUMENTED_REFUSALS}},
        }
    )


def aim_at_a_job(case: Any, job_ids: list[str]) -> None:
    """Point half the cases with a valid ``job_id`` (never a DELETE) at one of ``job_ids``, so
    the epoch, feedback and stats paths run with fuzzed queries and bodies; an invalid id is what
    a negative case tests, so it stays."""
    params = case.path_parameters or {}
    if "job_id" not in params or case.method.upper() == "DELETE":
        return
    if not re.fullmatch(JOB_ID_PATTERN, str(params["job_id"])):
        return
    h = zlib.crc32(repr((case.method, case.path, params, case.query, case.body)).encode())
    if h % 2:
        params["job_id"] = job_ids[(h >> 1) % len(job_ids)]
