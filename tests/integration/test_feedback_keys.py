"""Keyed feedback on the job manager (local Ray, no HTTP): a repeated (rank, epoch, seq) is
acknowledged without being applied, also after a restart, so the next epoch equals that of a run
that received each post once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from service.jobs import JobManager
from service.specs import job_spec_from_dict
from service.store import JobStore

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]


def _spec(uri: str) -> object:
    return job_spec_from_dict(
        {
            "name": "digits-ucb",
            "dataset": {
                "uri": uri,
                "label_column": "label",
                "feature": {"kind": "pixels", "column": "image", "dim": 16},
            },
            "policy": {"name": "ucb", "ratio": 0.3, "epochs": 3, "seed": 4},
        },
        allowed_roots=[str(Path(uri).parent)],
    )


def _losses(idx: np.ndarray) -> np.ndarray:
    return (idx % 11).astype(np.float32) / 11.0


def test_repeated_keys_apply_once_across_a_restart(digits_uri: str, tmp_path: Path) -> None:
    async def run(store: str, repeat: bool) -> np.ndarray:
        manager = JobManager(JobStore(store))
        job = (await manager.create_job(_spec(digits_uri))).id
        await manager.wait_ready(job, timeout=120)
        idx = await manager.epoch_indices(job, 0, 0, 1)
        halves = np.array_split(idx, 2)
        applied = [
            await manager.feedback(job, 0, h, _losses(h), (0, s)) for s, h in enumerate(halves)
        ]
        assert applied == [True, True]
        if repeat:  # a client retrying both posts whose answers it lost
            assert await manager.feedback(job, 0, halves[0], _losses(halves[0]), (0, 0)) is False
            await manager.close()
            manager = JobManager(JobStore(store))  # the service restarts
            assert await manager.resume() == [job]
            await manager.wait_ready(job, timeout=120)
            assert await manager.feedback(job, 0, halves[1], _losses(halves[1]), (0, 1)) is False
            assert await manager.feedback(job, 0, halves[1], _losses(halves[1]), (1, 1)) is True
        else:
            assert await manager.feedback(job, 0, halves[1], _losses(halves[1]), (1, 1)) is True
        out = await manager.epoch_indices(job, 1, 0, 1)
        await manager.close()
        return out

    once = asyncio.run(run(str(tmp_path / "once"), repeat=False))
    repeated = asyncio.run(run(str(tmp_path / "repeated"), repeat=True))
    np.testing.assert_array_equal(repeated, once)
