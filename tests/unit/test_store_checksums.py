"""Checksums of the store: every kind of committed file, flipped or truncated, is detected and
named; uncommitted leftovers and crashes between a file and its manifest are not corruption."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from saelect.service.job_scoring import SCORING_MANIFEST, seal_scoring
from saelect.service.store import MANIFEST_FILE, JobState, JobStore
from saelect.workers.storage import CorruptFileError, Storage, digest, verify_tree, write_manifest

from tests.unit.test_store import make_spec

JOB = "j-1"


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte, mid-file
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE: dict[str, Callable[[Path], None]] = {"flip": _flip, "truncate": _truncate}


def _filled(root: Path) -> JobStore:
    """A job with two epochs (stats, weights), a feedback file, a feedback-log entry."""
    store = JobStore(str(root))
    store.create_job(JOB, make_spec())
    for t in range(2):
        order = np.arange(10 * t, 10 * t + 10, dtype=np.int64)[::-1]
        store.write_epoch(JOB, t, order, stats={"size": 10}, weights=np.full(10, 0.5, np.float32))
    store.append_feedback(JOB, 0, np.array([1, 2]), np.array([0.5, 0.25]))
    store.write_file(JOB, "feedback_log/00000000.npz", b"arbitrary committed bytes")
    store.write_state(JOB, JobState(last_committed_epoch=1, seed=7, phase="ready"))
    return store


READS: dict[str, Callable[[JobStore], object]] = {
    "epochs/000001.npy": lambda s: s.read_epoch(JOB, 1),
    "epochs/000001.json": lambda s: s.read_epoch_stats(JOB, 1),
    "epochs/000001.weights.npy": lambda s: s.read_epoch_weights(JOB, 1),
    "state.json": lambda s: s.read_state(JOB),
    "spec.json": lambda s: s.read_spec(JOB),
    "feedback/000000.npz": lambda s: s.read_feedback(JOB, 0),
    "feedback_log/00000000.npz": lambda s: s.read_file(JOB, "feedback_log/00000000.npz"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("rel", sorted(READS))
def test_each_damaged_file_is_detected_and_named(tmp_path: Path, rel: str, damage: str) -> None:
    _filled(tmp_path)
    DAMAGE[damage](tmp_path / "jobs" / JOB / rel)
    fresh = JobStore(str(tmp_path))  # a restarted service: nothing cached
    with pytest.raises(CorruptFileError, match=f"{JOB}/{rel} is corrupted"):
        READS[rel](fresh)
    with pytest.raises(CorruptFileError, match=f"{JOB}/{rel}"):
        fresh.verify_job(JOB)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_manifest_is_detected(tmp_path: Path, damage: str) -> None:
    _filled(tmp_path)
    DAMAGE[damage](tmp_path / "jobs" / JOB / MANIFEST_FILE)
    with pytest.raises(CorruptFileError, match=f"{JOB}/{MANIFEST_FILE} is corrupted"):
        JobStore(str(tmp_path)).verify_job(JOB)


def test_a_missing_committed_file_is_named(tmp_path: Path) -> None:
    _filled(tmp_path)
    (tmp_path / "jobs" / JOB / "epochs" / "000000.npy").unlink()
    with pytest.raises(CorruptFileError, match=r"000000\.npy is corrupted: committed but missing"):
        JobStore(str(tmp_path)).verify_job(JOB)


def test_intact_files_read_back_and_verify(tmp_path: Path) -> None:
    _filled(tmp_path)
    fresh = JobStore(str(tmp_path))
    fresh.verify_job(JOB)
    assert fresh.committed_epochs(JOB) == [0, 1]
    assert fresh.read_epoch(JOB, 1).tolist() == list(range(19, 9, -1))  # type: ignore[union-attr]
    assert fresh.read_epoch_weights(JOB, 0).tolist() == [0.5] * 10  # type: ignore[union-attr]
    assert fresh.read_state(JOB).last_committed_epoch == 1


def test_an_uncommitted_leftover_reads_as_absent_and_is_replaced(tmp_path: Path) -> None:
    """A crash after an epoch file and before its manifest: the epoch was never served."""
    store = _filled(tmp_path)
    Storage(str(tmp_path / "jobs" / JOB)).write_bytes("epochs/000002.npy", b"half a commit")
    fresh = JobStore(str(tmp_path))
    fresh.verify_job(JOB)
    assert fresh.read_epoch(JOB, 2) is None and fresh.committed_epochs(JOB) == [0, 1]
    fresh.write_epoch(JOB, 2, np.array([4, 5]))
    assert JobStore(str(tmp_path)).read_epoch(JOB, 2).tolist() == [4, 5]  # type: ignore[union-attr]
    assert store.read_epoch(JOB, 0) is not None


def test_a_crash_between_the_manifest_and_the_state_keeps_the_previous_state(
    tmp_path: Path,
) -> None:
    store = _filled(tmp_path)
    state_path = tmp_path / "jobs" / JOB / "state.json"
    previous = state_path.read_bytes()
    store.write_state(JOB, JobState(last_committed_epoch=5, seed=7, phase="ready"))
    state_path.write_bytes(previous)  # the manifest was written, the state's move was not
    fresh = JobStore(str(tmp_path))
    fresh.verify_job(JOB)
    assert fresh.read_state(JOB).last_committed_epoch == 1


def test_a_store_written_before_manifests_is_adopted(tmp_path: Path) -> None:
    _filled(tmp_path)
    (tmp_path / "jobs" / JOB / MANIFEST_FILE).unlink()
    adopted = JobStore(str(tmp_path))
    adopted.verify_job(JOB)
    assert (tmp_path / "jobs" / JOB / MANIFEST_FILE).exists()
    assert adopted.committed_epochs(JOB) == [0, 1]
    _flip(tmp_path / "jobs" / JOB / "epochs" / "000000.npy")  # protected from now on
    with pytest.raises(CorruptFileError, match=r"000000\.npy"):
        JobStore(str(tmp_path)).verify_job(JOB)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_sealed_scoring_names_its_damaged_output(tmp_path: Path, damage: str) -> None:
    scoring = Storage(str(tmp_path / "scoring" / "k"))
    scoring.write_npz("shards/00000/codes.npz", ids=np.arange(64), values=np.ones(64))
    scoring.write_json("pipeline.json", {"phase": "ready"})
    seal_scoring(scoring)
    assert verify_tree(scoring, SCORING_MANIFEST) is None
    DAMAGE[damage](tmp_path / "scoring" / "k" / "shards" / "00000" / "codes.npz")
    problem = verify_tree(scoring, SCORING_MANIFEST)
    assert problem is not None and "shards/00000/codes.npz is corrupted" in problem
    (tmp_path / "scoring" / "k" / "shards" / "00000" / "codes.npz").unlink()
    assert "codes.npz is missing" in (verify_tree(scoring, SCORING_MANIFEST) or "")


def test_manifest_entries_accept_only_the_committed_digests(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    write_manifest(storage, "m.json", {"a": [digest(b"abc")]})
    storage.write_bytes("a", b"abd")
    assert "a is corrupted" in (verify_tree(storage, "m.json") or "")
    storage.write_bytes("a", b"abc")
    assert verify_tree(storage, "m.json") is None
