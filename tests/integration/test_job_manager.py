"""The job manager on local Ray, without HTTP: lifecycle log lines, one unreadable stored job
that fails alone while the others resume, and keyed feedback applied once across a restart.

Jobs use score-free policies (`rs2`, `ucb`) on scikit-learn digits, so each is ready in a second
or two.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from saelect.service.errors import JobNotReady
from saelect.service.jobs import JobManager
from saelect.service.specs import job_spec_from_dict
from saelect.service.store import JobStore

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]


def _spec(uri: str, policy: str = "rs2") -> Any:
    return job_spec_from_dict(
        {
            "name": f"digits-{policy}",
            "dataset": {
                "uri": uri,
                "label_column": "label",
                "feature": {"kind": "pixels", "column": "image", "dim": 16},
            },
            "policy": {"name": policy, "ratio": 0.3, "epochs": 4, "seed": 2},
        },
        allowed_roots=[str(Path(uri).parent)],
    )


def test_lifecycle_is_logged_one_line_per_event(
    digits_uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> str:
        manager = JobManager(JobStore(str(tmp_path / "store")))
        job = (await manager.create_job(_spec(digits_uri))).id
        assert (await manager.wait_ready(job, timeout=120)).phase == "ready"
        for t in range(2):
            await manager.epoch_indices(job, t, 0, 1)
        await manager.epoch_indices(job, 1, 0, 2)  # served from memory: no new event
        await manager.delete_job(job)
        await manager.close()
        return job

    with caplog.at_level(logging.INFO, logger="saelect.service.jobs"):
        job = asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == "saelect.service.jobs"]
    assert all(job in line for line in lines), lines

    def count(fragment: str) -> int:
        return sum(fragment in line for line in lines)

    assert count(": created (policy rs2, ratio 0.3, 4 epochs, no scoring") == 1
    assert count(": pending -> ready after") == 1
    assert count(": ready (1797 samples") == 1
    assert count(": epoch 0 selected (539 samples") == 1
    assert count(": epoch 1 selected (539 samples") == 1
    assert count(": deleted") == 1
    assert len(lines) == 6


def test_an_unreadable_stored_job_fails_alone(digits_uri: str, tmp_path: Path) -> None:
    """A truncated state.json fails its job with the reason; the other job resumes identically
    and the service keeps serving; the broken job can be deleted."""
    store = str(tmp_path / "store")

    async def first() -> tuple[str, str, np.ndarray]:
        manager = JobManager(JobStore(store))
        good = (await manager.create_job(_spec(digits_uri, "ucb"))).id
        bad = (await manager.create_job(_spec(digits_uri))).id
        for j in (good, bad):
            await manager.wait_ready(j, timeout=120)
        served = await manager.epoch_indices(good, 0, 0, 1)
        await manager.close()
        return good, bad, served

    good, bad, served = asyncio.run(first())
    state = tmp_path / "store" / "jobs" / bad / "state.json"
    state.write_text(state.read_text()[:7])  # a truncated write

    async def second() -> None:
        manager = JobManager(JobStore(store))
        assert sorted(await manager.resume()) == sorted([good, bad])
        status = await manager.get_job(bad)
        assert status.phase == "failed" and "unreadable" in (status.error or "")
        assert {s.id: s.phase for s in await manager.list_jobs()}[bad] == "failed"
        with pytest.raises(JobNotReady, match="unreadable"):
            await manager.epoch_indices(bad, 0, 0, 1)
        await manager.wait_ready(good, timeout=120)
        np.testing.assert_array_equal(await manager.epoch_indices(good, 0, 0, 1), served)
        await manager.delete_job(bad)
        assert [s.id for s in await manager.list_jobs()] == [good]
        assert not (tmp_path / "store" / "jobs" / bad).exists()
        await manager.close()

    asyncio.run(second())


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":
        path.write_bytes(data[:40] + bytes([data[40] ^ 1]) + data[41:])
    else:
        path.write_bytes(data[: len(data) // 2])


def test_a_corrupt_file_fails_its_own_job_and_a_corrupt_scoring_is_recomputed(
    digits_uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Checksums (the store's manifests): a flipped epoch and a truncated feedback-log entry fail
    their own jobs, naming the file; a truncated scoring output is recomputed and its job serves
    the same epochs; the untouched job resumes identically."""
    store = str(tmp_path / "store")
    scored = job_spec_from_dict(
        {**_spec(digits_uri).to_dict(), "name": "scored",
         "policy": {"name": "factor", "ratio": 0.3, "epochs": 4, "seed": 2},
         "sae": {"units": 64, "k": 4, "epochs": 2}},
        allowed_roots=[str(Path(digits_uri).parent)],
    )  # fmt: skip

    async def first() -> tuple[dict[str, str], dict[str, list[np.ndarray]]]:
        manager = JobManager(JobStore(store))
        specs = {"good": _spec(digits_uri, "ucb"), "epoch": _spec(digits_uri),
                 "feedback": _spec(digits_uri, "ucb"), "scored": scored}  # fmt: skip
        ids = {k: (await manager.create_job(s)).id for k, s in specs.items()}
        served: dict[str, list[np.ndarray]] = {}
        for kind, job in ids.items():
            assert (await manager.wait_ready(job, timeout=300)).phase == "ready", kind
            served[kind] = [await manager.epoch_indices(job, 0, 0, 1)]
            if kind in ("good", "feedback"):
                losses = np.linspace(0, 1, served[kind][0].size, dtype=np.float32)
                await manager.feedback(job, 0, served[kind][0], losses)
            served[kind].append(await manager.epoch_indices(job, 1, 0, 1))
        await manager.close()
        return ids, served

    ids, served = asyncio.run(first())
    jobs = tmp_path / "store" / "jobs"
    _damage(jobs / ids["epoch"] / "epochs" / "000001.npy", "flip")
    _damage(jobs / ids["feedback"] / "feedback_log" / "00000000.npz", "truncate")
    (codes,) = list((tmp_path / "store" / "scoring").glob("*/shards/00000/codes.npz"))
    _damage(codes, "truncate")

    async def second() -> None:
        manager = JobManager(JobStore(store))
        await manager.resume()
        for kind, rel in (("epoch", "epochs/000001.npy"), ("feedback", "feedback_log/0000")):
            status = await manager.get_job(ids[kind])
            assert status.phase == "failed", kind
            assert f"{ids[kind]}/{rel}" in (status.error or "") and "corrupted" in status.error
            with pytest.raises(JobNotReady, match="corrupted"):
                await manager.epoch_indices(ids[kind], 0, 0, 1)
        for kind in ("good", "scored"):
            assert (await manager.wait_ready(ids[kind], timeout=300)).phase == "ready", kind
            for t in (0, 1):
                got = await manager.epoch_indices(ids[kind], t, 0, 1)
                np.testing.assert_array_equal(got, served[kind][t])
        await manager.close()

    with caplog.at_level(logging.WARNING, logger="saelect.service.jobs"):
        asyncio.run(second())
    assert any("codes.npz" in r.getMessage() and "recomputing" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def _losses(idx: np.ndarray) -> np.ndarray:
    return (idx % 11).astype(np.float32) / 11.0


def test_repeated_keys_apply_once_across_a_restart(digits_uri: str, tmp_path: Path) -> None:
    """Keyed feedback: a repeated (rank, epoch, seq) is acknowledged without being applied, also
    after a restart, so the next epoch equals that of a run that received each post once."""

    async def run(store: str, repeat: bool) -> np.ndarray:
        manager = JobManager(JobStore(store))
        job = (await manager.create_job(_spec(digits_uri, "ucb"))).id
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
