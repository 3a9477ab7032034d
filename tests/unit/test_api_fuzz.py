"""schemathesis against ``/openapi.json`` of the app over the FakeBackend (no Ray): every
operation, with the token and without it, a bounded number of examples each (seeded, so a run is
repeatable). Checks: no 5xx, every answer's status, content type, headers and body match the
schema, schema-valid requests get only the documented refusals, invalid ones are refused.

Half of the cases (by a hash of the case) aim at existing ready jobs (a ``factor`` and a ``ucb``
job) instead of the random job id, so the epoch, feedback and stats paths run with fuzzed
queries and bodies. The real service gets a shorter run in
tests/integration/test_service_ray.py (`test_schemathesis_against_the_real_service`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from saelect.service.app import create_app
from saelect.service.settings import Settings
from saelect.service.specs import job_spec_from_dict

from tests.fuzz import aim_at_a_job, fuzz_config
from tests.unit.fakes import FakeBackend

TOKEN = "fuzz-token"
EXAMPLES = 10
"""Fuzzed examples per operation (plus the examples and coverage phases' own cases)."""
JOBS = {"fuzz-factor": "factor", "fuzz-ucb": "ucb"}


ROOT = tempfile.mkdtemp(prefix="saelect-fuzz-")
BACKEND = FakeBackend(1000)
APP = create_app(
    BACKEND,
    Settings(
        store=os.path.join(ROOT, "store"), allowed_roots=[ROOT], api_token=TOKEN, docs_open=True
    ),
)


def ensure_jobs() -> None:
    """(Re)create the ready jobs the cases aim at, under fixed ids."""
    for job_id, policy in JOBS.items():
        if job_id in BACKEND.jobs:
            continue
        spec = job_spec_from_dict(
            {
                "name": job_id,
                "dataset": {
                    "uri": os.path.join(ROOT, "data.parquet"),
                    "feature": {"kind": "pixels", "column": "image"},
                },
                "policy": {"name": policy, "ratio": 0.3, "epochs": 4, "seed": 1},
            },
            allowed_roots=[ROOT],
        )
        made = asyncio.run(BACKEND.create_job(spec)).id
        job = BACKEND.jobs.pop(made)
        job.status = dataclasses.replace(job.status, id=job_id)
        BACKEND.jobs[job_id] = job


schema = schemathesis.openapi.from_asgi("/openapi.json", APP, config=fuzz_config(examples=EXAMPLES))
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck))


@schema.parametrize()
@FUZZ
def test_fuzz_with_the_token(case: Any) -> None:
    ensure_jobs()
    aim_at_a_job(case, list(JOBS))
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"})


unauth = schemathesis.openapi.from_asgi(
    "/openapi.json", APP, config=fuzz_config(examples=EXAMPLES, seed=2, coverage=False)
)


@unauth.parametrize()
@FUZZ
def test_fuzz_without_the_token(case: Any) -> None:
    """Without a token every route but /healthz answers 401 (and still matches its schema)."""
    ensure_jobs()
    aim_at_a_job(case, list(JOBS))
    response = case.call()
    if case.path == "/healthz":
        assert response.status_code == 200
    else:
        assert response.status_code == 401, (case.method, case.path, response.text)
        assert "Bearer" in response.headers["www-authenticate"]
    case.validate_response(response, excluded_checks=_positive_acceptance())


def _positive_acceptance() -> list[Any]:
    """The check that expects schema-valid data to be accepted (it is not, without a token)."""
    return [schemathesis.checks.positive_data_acceptance]
