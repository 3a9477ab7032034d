"""saelect.service.store: the job store (docs/reliability.md, Persistence) on local paths,
file:// URIs and in-memory filesystems."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyarrow.fs import _MockFileSystem
from saelect.service.errors import InvalidRequest, UnknownJob
from saelect.service.specs import JobSpec, job_spec_from_dict
from saelect.service.store import MANIFEST_FILE, JobState, JobStore, check_job_id, new_job_id
from saelect.workers.storage import Storage

SPEC_DICT = {
    "name": "fmnist",
    "dataset": {
        "uri": "/usr/share/datasets/fashion-mnist/train.parquet",
        "label_column": "label",
        "feature": {"kind": "pixels", "column": "image", "dim": 64},
    },
    "policy": {"name": "factor", "ratio": 0.3, "epochs": 5, "seed": 7, "params": {}},
    "sae": {"units": 128, "k": 16},
}


def make_spec() -> JobSpec:
    return job_spec_from_dict(SPEC_DICT, allowed_roots=["/usr/share/datasets"])


@pytest.fixture(params=["path", "file_uri", "mockfs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    if request.param == "path":
        return JobStore(str(tmp_path / "store"))
    if request.param == "file_uri":
        return JobStore(f"file://{tmp_path}/store")
    return JobStore(Storage("/store", filesystem=_MockFileSystem()))


def test_spec_round_trip_through_the_store(store: JobStore) -> None:
    spec = make_spec()
    store.create_job("job-a", spec)
    back = store.read_spec("job-a")
    assert back == spec
    assert back.policy.seed == 7 and back.sae.k == 16 and back.dataset.feature.dim == 64
    assert JobSpec.from_dict(spec.to_dict()) == spec


def test_jobs_list_state_and_delete(store: JobStore) -> None:
    spec = make_spec()
    assert store.list_jobs() == []
    for job in ["b-1", "a-2"]:
        store.create_job(job, spec)
    assert store.list_jobs() == ["a-2", "b-1"] and store.has_job("a-2")
    with pytest.raises(ValueError, match="already exists"):
        store.create_job("a-2", spec)
    state = store.read_state("a-2")
    assert state == JobState(last_committed_epoch=-1, seed=7)
    new = JobState(
        last_committed_epoch=2,
        seed=7,
        phase="ready",
        num_samples=60000,
        extra={"coverage": [0.1, 0.2]},
    )
    store.write_state("a-2", new)
    assert store.read_state("a-2") == new
    store.write_epoch("a-2", 0, np.arange(3))
    store.job_storage("a-2").write_npy("shards/00000/counts.npy", np.ones(4))
    store.delete_job("a-2")
    assert store.list_jobs() == ["b-1"] and not store.has_job("a-2")
    assert store.read_epoch("a-2", 0) is None
    for call in (store.read_spec, store.read_state, store.delete_job):
        with pytest.raises(UnknownJob):
            call("a-2")
    with pytest.raises(UnknownJob):
        store.write_state("a-2", new)


def test_epochs_are_write_once(store: JobStore) -> None:
    store.create_job("j", make_spec())
    assert store.committed_epochs("j") == [] and store.read_epoch("j", 0) is None
    order = np.array([5, 3, 9, 1], dtype=np.int64)
    store.write_epoch("j", 0, order)
    store.write_epoch("j", 0, order.copy())  # same content again: no-op
    store.write_epoch("j", 12, order[::-1])
    assert store.committed_epochs("j") == [0, 12]
    got = store.read_epoch("j", 0)
    assert got is not None and got.dtype == np.int64 and got.tolist() == [5, 3, 9, 1]
    with pytest.raises(ValueError, match="already stored differently"):
        store.write_epoch("j", 0, order[::-1])
    with pytest.raises(ValueError, match="epoch"):
        store.write_epoch("j", -1, order)
    with pytest.raises(ValueError, match="1-D"):
        store.write_epoch("j", 1, order.reshape(2, 2))
    assert store.job_storage("j").list_dir("epochs") == ["000000.npy", "000012.npy"]


def test_store_survives_a_restart(tmp_path: Path) -> None:
    first = JobStore(str(tmp_path))
    first.create_job("j", make_spec())
    first.write_epoch("j", 0, np.array([2, 0, 1]))
    first.write_state("j", JobState(last_committed_epoch=0, seed=7, phase="ready"))
    second = JobStore(f"file://{tmp_path}")
    assert second.list_jobs() == ["j"]
    assert second.read_state("j").last_committed_epoch == 0
    assert second.read_epoch("j", 0).tolist() == [2, 0, 1]  # type: ignore[union-attr]


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 30), st.floats(0, 10, width=32)), max_size=20),
        min_size=1,
        max_size=5,
    )
)
def test_feedback_merges_posts_and_keeps_the_latest_loss(
    posts: list[list[tuple[int, float]]],
) -> None:
    store = JobStore(Storage("/s", filesystem=_MockFileSystem()))
    expected: dict[int, float] = {}
    for post in posts:
        idx = np.array([i for i, _ in post], dtype=np.int64)
        val = np.array([v for _, v in post], dtype=np.float32)
        for i, v in post:
            expected[i] = v
        count = store.append_feedback("j", 3, idx, val)
        assert count == len(expected)
    got = store.read_feedback("j", 3)
    assert got is not None
    assert got[0].tolist() == sorted(expected)
    assert got[1].tolist() == [np.float32(expected[i]) for i in sorted(expected)]
    assert store.read_feedback("j", 4) is None


def test_feedback_retry_is_idempotent(store: JobStore) -> None:
    idx, val = np.array([4, 2]), np.array([0.5, 1.5])
    store.append_feedback("j", 0, idx, val)
    store.append_feedback("j", 0, idx, val)
    got = store.read_feedback("j", 0)
    assert got is not None and got[0].tolist() == [2, 4] and got[1].tolist() == [1.5, 0.5]
    with pytest.raises(ValueError, match="length"):
        store.append_feedback("j", 0, idx, val[:1])


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "a.b", "x" * 129])
def test_unsafe_job_ids_refused(store: JobStore, bad: str) -> None:
    with pytest.raises(UnknownJob):
        check_job_id(bad)
    with pytest.raises(UnknownJob):
        store.job_storage(bad)
    assert not store.has_job(bad)


def test_new_job_ids_are_safe_and_unique() -> None:
    ids = {new_job_id("My job/../ #1") for _ in range(50)}
    assert len(ids) == 50
    for job_id in ids:
        assert check_job_id(job_id) == job_id and job_id.startswith("My-job-1-")
    assert new_job_id("////").startswith("job-")


def test_state_validation_and_forward_compat() -> None:
    with pytest.raises(ValueError, match="last_committed_epoch"):
        JobState(last_committed_epoch=-2)
    with pytest.raises(ValueError, match="num_samples"):
        JobState(num_samples=-1)
    assert JobState.from_dict({"seed": 3, "future_field": 1}) == JobState(seed=3)


def test_spec_from_dict_rejects_bad_sections() -> None:
    with pytest.raises(InvalidRequest, match="dataset"):
        JobSpec.from_dict({"name": "x", "dataset": 3, "policy": SPEC_DICT["policy"]})
    with pytest.raises(InvalidRequest, match=r"dataset\.uri"):
        JobSpec.from_dict({"name": "x", "dataset": {}, "policy": SPEC_DICT["policy"]})
    with pytest.raises(InvalidRequest, match="policy"):
        JobSpec.from_dict({**SPEC_DICT, "policy": {"name": "factor", "ratio": 2.0, "epochs": 1}})


def test_bytes_written_counts_the_jobs_tree_only(store: JobStore) -> None:
    spec = make_spec()
    store.create_job("job-1", spec)
    store.write_epoch("job-1", 0, np.arange(40))
    store.append_feedback("job-1", 0, np.arange(4), np.ones(4, dtype=np.float32))
    counted = store.bytes_written
    assert counted >= store.storage.size("jobs") > 0  # every file once at least (manifests: more)
    store.storage.child("scoring/k").write_bytes("codes.bin", b"c" * 100)  # not a job write
    assert store.bytes_written == counted
    store.write_state("job-1", JobState(last_committed_epoch=0, seed=7))  # state + its manifest
    rewritten = [f"jobs/job-1/{name}" for name in ("state.json", MANIFEST_FILE)]
    assert store.bytes_written == counted + sum(store.storage.size(rel) for rel in rewritten)
