"""saelect.workers.storage: round trips on local paths, file:// URIs and an in-memory pyarrow fs;
atomic writes never expose partial files."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyarrow.fs import _MockFileSystem
from saelect.workers.storage import TMP_MARKER, Storage, WriteTally

KINDS = ["path", "file_uri", "mockfs"]


def make_storage(kind: str, tmp: Path) -> Storage:
    if kind == "path":
        return Storage(str(tmp / "root"))
    if kind == "file_uri":
        return Storage(f"file://{tmp}/root")
    return Storage("/root", filesystem=_MockFileSystem())


@pytest.fixture(params=KINDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return make_storage(request.param, tmp_path)


def test_round_trips(storage: Storage) -> None:
    storage.write_bytes("a/b/raw.bin", b"\x00\x01hello")
    assert storage.read_bytes("a/b/raw.bin") == b"\x00\x01hello"
    doc = {"x": [1, 2.5, None], "y": {"z": "w"}}
    storage.write_json("doc.json", doc)
    assert storage.read_json("doc.json") == doc
    arr = np.arange(12, dtype=np.int64).reshape(3, 4)
    storage.write_npy("arr.npy", arr)
    back = storage.read_npy("arr.npy")
    assert back.dtype == arr.dtype and np.array_equal(back, arr)
    storage.write_npz("codes.npz", ids=arr.astype(np.int32), values=arr.astype(np.float16))
    z = storage.read_npz("codes.npz")
    assert set(z) == {"ids", "values"} and z["ids"].dtype == np.int32
    table = pa.table({"label": pa.array([1, 2, 3], pa.int64())})
    storage.write_parquet("t/data.parquet", table)
    assert storage.read_parquet("t/data.parquet").equals(table)


def test_directory_operations(storage: Storage) -> None:
    assert not storage.exists("d") and storage.list_dir("d") == []
    for name in ["b.npy", "a.npy"]:
        storage.write_npy(f"d/{name}", np.zeros(2))
    storage.write_bytes("d/sub/x", b"1")
    assert storage.exists("d") and storage.exists("d/a.npy")
    assert storage.list_dir("d") == ["a.npy", "b.npy", "sub"]
    child = storage.child("d")
    assert child.list_dir() == ["a.npy", "b.npy", "sub"]
    assert child.read_bytes("sub/x") == b"1"
    child.write_bytes("c", b"2")
    assert storage.read_bytes("d/c") == b"2"
    storage.delete("d/a.npy")
    assert storage.list_dir("d") == ["b.npy", "c", "sub"]
    storage.delete("d")
    assert not storage.exists("d")
    storage.delete("d")  # missing: no error


def test_missing_file_raises(storage: Storage) -> None:
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("nope")
    with pytest.raises(FileNotFoundError):
        storage.read_parquet("nope.parquet")


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/abs", "a/./b", "a\\b"])
def test_unsafe_relative_paths_refused(storage: Storage, rel: str) -> None:
    with pytest.raises(ValueError, match="storage path"):
        storage.write_bytes(rel, b"1")
    with pytest.raises(ValueError, match="storage path"):
        storage.child(rel)


def test_root_cannot_be_deleted_or_written(storage: Storage) -> None:
    with pytest.raises(ValueError, match="storage root"):
        storage.delete("")
    with pytest.raises(ValueError, match="storage root"):
        storage.write_bytes("", b"x")
    assert storage.list_dir() == []  # nothing was written


def test_bad_roots() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        Storage("")
    with pytest.raises(ValueError, match="unsupported storage URI"):
        Storage("nosuchscheme://bucket/x")


def test_file_uri_and_path_see_the_same_files(tmp_path: Path) -> None:
    Storage(str(tmp_path)).write_json("j.json", {"a": 1})
    assert Storage(f"file://{tmp_path}").read_json("j.json") == {"a": 1}
    assert (tmp_path / "j.json").is_file()


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    s = Storage(str(tmp_path))
    s.write_bytes("f.bin", b"old")

    class Boom:  # not bytes-like: the output stream's write raises mid-way
        pass

    with pytest.raises(TypeError):
        s.write_bytes("f.bin", Boom())  # type: ignore[arg-type]
    assert s.read_bytes("f.bin") == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_temp_files_are_hidden(tmp_path: Path) -> None:
    s = Storage(str(tmp_path))
    (tmp_path / f".x.npy{TMP_MARKER}abc").write_bytes(b"partial")
    s.write_bytes("x.npy", b"1")
    assert s.list_dir() == ["x.npy"]


def test_readers_never_see_partial_writes(tmp_path: Path) -> None:
    """A reader racing a writer sees one of the complete versions, never a torn one."""
    s = Storage(str(tmp_path))
    versions = [bytes([v]) * (1 << 20) for v in range(4)]
    s.write_bytes("big.bin", versions[0])
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            s.write_bytes("big.bin", versions[i % 4])
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(60):
            assert s.read_bytes("big.bin") in versions
    finally:
        stop.set()
        t.join()


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c/d"]), st.binary(max_size=64)),
        min_size=1,
        max_size=12,
    )
)
def test_last_write_wins(writes: list[tuple[str, bytes]]) -> None:
    s = Storage("/r", filesystem=_MockFileSystem())
    expected: dict[str, bytes] = {}
    for rel, data in writes:
        s.write_bytes(rel, data)
        expected[rel] = data
    for rel, data in expected.items():
        assert s.read_bytes(rel) == data


READERS: list[tuple[str, Callable[[Storage, str], object]]] = [
    ("read_json", Storage.read_json),
    ("read_npy", Storage.read_npy),
]


@pytest.mark.parametrize(("name", "reader"), READERS)
def test_typed_readers_raise_on_missing(name: str, reader: Callable, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        reader(Storage(str(tmp_path)), f"{name}.missing")


@pytest.mark.parametrize("kind", ["path", "file_uri"])
def test_storage_pickles_for_ray_actors(kind: str, tmp_path: Path) -> None:
    import pickle

    s = make_storage(kind, tmp_path).child("job")
    s.write_json("a.json", [1])
    back = pickle.loads(pickle.dumps(s))
    assert back.read_json("a.json") == [1] and back.path("a.json") == s.path("a.json")


def test_the_tally_counts_every_byte_written_through_a_root_and_its_children(
    tmp_path: Path,
) -> None:
    import pickle

    root = Storage(str(tmp_path / "s"))
    root.write_bytes("a.bin", b"x" * 10)
    root.child("jobs").write_json("j/state.json", {"phase": "ready"})
    root.child("jobs").child("j").write_npy("e.npy", np.arange(5))
    own = root.child("scoring", tally=WriteTally())
    own.write_bytes("codes.bin", b"y" * 7)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "s").rglob("*") if f.is_file())
    assert root.tally.bytes == on_disk - 7 == root.size() - own.size()
    assert own.tally.bytes == 7 == own.size() == root.size("scoring/codes.bin")
    root.write_bytes("a.bin", b"z" * 3)  # a rewrite counts again
    assert root.tally.bytes == on_disk - 7 + 3
    assert root.size("missing") == 0
    copy = pickle.loads(pickle.dumps(root))  # a task's copy counts its own writes only
    copy.write_bytes("b.bin", b"w" * 5)
    assert copy.tally.bytes == 5 and root.tally.bytes == on_disk - 4
