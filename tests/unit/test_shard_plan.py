"""Shard plan over Parquet row groups: coverage, order, boundaries and clear errors."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from saelect.workers.shard_plan import (
    check_allowed,
    default_num_shards,
    plan_shards,
    read_shard,
    row_keys,
)


def _write(path: Path, start: int, n: int, row_group_size: int) -> None:
    """A file with columns `x` (global index) and `vec` (fixed-size list of 3 floats)."""
    x = np.arange(start, start + n, dtype=np.int64)
    vec = pa.FixedSizeListArray.from_arrays(
        pa.array(np.repeat(x, 3).astype(np.float32)), list_size=3
    )
    pq.write_table(pa.table({"x": x, "vec": vec}), path, row_group_size=row_group_size)


@settings(max_examples=25, deadline=None)
@given(
    file_rows=st.lists(st.integers(1, 60), min_size=1, max_size=4),
    row_group_size=st.integers(1, 25),
    num_shards=st.integers(1, 9),
)
def test_shards_cover_all_rows_once_in_order(
    file_rows: list[int], row_group_size: int, num_shards: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        start = 0
        for i, n in enumerate(file_rows):
            _write(Path(tmp) / f"part-{i:03d}.parquet", start, n, row_group_size)
            start += n
        plan = plan_shards(tmp, num_shards, columns=["x"])
        total = sum(file_rows)
        assert plan.num_rows == total
        assert plan.num_shards == min(num_shards, total)
        bounds = plan.boundaries()
        assert bounds[0] == 0 and bounds[-1] == total
        assert all(a < b for a, b in itertools.pairwise(bounds))
        got = np.concatenate([read_shard(s, ["x"])["x"].to_numpy() for s in plan.shards])
        np.testing.assert_array_equal(got, np.arange(total))
        for s in plan.shards:
            assert read_shard(s, ["x"]).num_rows == s.num_rows
        # With at least S row groups, every boundary is a row-group end.
        group_ends = np.cumsum([n for sizes in plan.row_group_rows for n in sizes])
        if len(group_ends) >= plan.num_shards:
            assert set(bounds[1:]) <= set(group_ends.tolist())


def test_boundaries_are_balanced_on_row_groups(tmp_path: Path) -> None:
    _write(tmp_path / "a.parquet", 0, 8000, 1000)
    plan = plan_shards(str(tmp_path / "a.parquet"), 4)
    assert plan.boundaries() == [0, 2000, 4000, 6000, 8000]
    assert all(len(p.row_groups) == 2 for s in plan.shards for p in s.pieces)


def test_small_dataset_splits_inside_one_row_group(tmp_path: Path) -> None:
    _write(tmp_path / "a.parquet", 0, 10, 100)
    plan = plan_shards(str(tmp_path / "a.parquet"), 4)
    assert plan.boundaries() == [0, 2, 5, 8, 10]
    vec = read_shard(plan.shards[1], ["vec"])["vec"]
    assert vec.to_pylist() == [[2.0] * 3, [3.0] * 3, [4.0] * 3]


def test_default_shard_count_follows_resources(tmp_path: Path) -> None:
    assert default_num_shards(8) == 16
    assert default_num_shards(64, 4) == 8
    assert default_num_shards(0.5) == 2
    with pytest.raises(ValueError, match="per_device"):
        default_num_shards(2, per_device=0)
    _write(tmp_path / "a.parquet", 0, 100, 10)
    assert plan_shards(str(tmp_path / "a.parquet"), num_cpus=2).num_shards == 4
    assert plan_shards(str(tmp_path / "a.parquet"), num_cpus=2, num_gpus=1).num_shards == 2


def test_uri_form_is_accepted(tmp_path: Path) -> None:
    _write(tmp_path / "a.parquet", 0, 30, 10)
    plan = plan_shards(f"file://{tmp_path}", 3)
    assert plan.num_rows == 30
    assert read_shard(plan.shards[2], ["x"])["x"].to_pylist() == list(range(20, 30))


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        plan_shards(str(tmp_path / "nope.parquet"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet at all")
    with pytest.raises(ValueError, match="not a Parquet file"):
        plan_shards(str(bad))
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"x": pa.array([], pa.int64())}), empty)
    with pytest.raises(ValueError, match="empty"):
        plan_shards(str(empty))
    good = tmp_path / "good.parquet"
    _write(good, 0, 5, 5)
    with pytest.raises(ValueError, match=r"\['image'\] not in dataset"):
        plan_shards(str(good), columns=["x", "image"])
    with pytest.raises(ValueError, match="outside the allowed roots"):
        plan_shards(str(good), allowed_roots=[str(tmp_path / "elsewhere")])
    with pytest.raises(ValueError, match="num_shards"):
        plan_shards(str(good), 0)
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="no files"):
        plan_shards(str(empty_dir))
    with pytest.raises(ValueError, match="missing"):
        read_shard(plan_shards(str(good), 1).shards[0], ["missing"])


def test_allowed_roots_resolve_dotdot_and_match_uri_prefixes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    check_allowed(str(root / "x.parquet"), [str(root)])
    with pytest.raises(ValueError, match="outside"):
        check_allowed(str(root / ".." / "secret.parquet"), [str(root)])
    with pytest.raises(ValueError, match="outside"):
        check_allowed(str(tmp_path / "data2" / "x.parquet"), [str(root)])
    check_allowed("s3://bucket/prefix/train.parquet", ["S3://bucket/prefix/"])
    with pytest.raises(ValueError, match="outside"):
        check_allowed("s3://bucket/prefix2/train.parquet", ["s3://bucket/prefix"])
    check_allowed("anything", None)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**40), cut=st.integers(0, 500))
def test_row_keys_do_not_depend_on_the_split(seed: int, cut: int) -> None:
    whole = row_keys(seed, 0, 500)
    np.testing.assert_array_equal(
        np.concatenate([row_keys(seed, 0, cut), row_keys(seed, cut, 500)]), whole
    )
    assert len(np.unique(whole)) == 500
    assert not np.array_equal(whole, row_keys(seed + 1, 0, 500))
