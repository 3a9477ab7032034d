"""Distributed scoring on local Ray: shards equal the single-process walk and the formulas,
resources are released, the protocol over state actors, faults, admission.

One local Ray (2 CPUs) for the whole module (`ray_local` in conftest.py). The two-node cluster
lives in test_two_node_ray.py, the logical-GPU clusters in test_gpu_resources.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from saelect.service.policies import PolicyConfig, make_policy
from saelect.service.policies.base import Stage
from saelect.service.selection.engine import SelectionEngine, SingleProcessSelector
from saelect.service.selection.threshold import global_top_m
from saelect.service.selection.topk import top_m
from saelect.workers.admission import ScoringResources
from saelect.workers.features import FeatureSpec
from saelect.workers.pipeline import run_scoring
from saelect.workers.pipeline_types import PipelineOptions, ScoringError
from saelect.workers.sae import SAEConfig
from saelect.workers.sae_fit import init_sae
from saelect.workers.sae_train import global_batches, train_sae_distributed
from saelect.workers.scores import ScoreConfig
from saelect.workers.scoring_local import SingleProcessScores, score_single_process
from saelect.workers.selection_shard import SelectionShard
from saelect.workers.selection_state import SelectionShards, SelectionStateActor
from saelect.workers.shard_data import ShardData
from saelect.workers.shard_plan import plan_shards
from saelect.workers.shard_scoring import shard_dir
from saelect.workers.storage import Storage

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]

FEATURE = FeatureSpec("pixels", "image", dim=32)
SAE = SAEConfig(units=128, k=8, epochs=3, batch_size=256, max_train_samples=1500)
SCORE = ScoreConfig()
POLICIES = [
    PolicyConfig("factor", 0.3, 4, seed=1, params={"class_quotas": True, "dynamic_coverage": True}),
    PolicyConfig("factor", 0.2, 3, seed=2, params={"sampling": "gumbel", "gamma": 0.5}),
]
QUIET = {"progress_bar": False}


def _score(storage: Storage, uri: str, **kw: Any) -> Any:
    """run_scoring with this module's feature, SAE and score configs, without a progress bar."""
    return run_scoring(storage, uri, FEATURE, "label", SAE, SCORE, **QUIET, **kw)


@pytest.fixture(scope="module")
def digits(digits_uri: str) -> tuple[str, SingleProcessScores]:
    """The digits dataset as Parquet and its single-process scores."""
    return digits_uri, score_single_process(digits_uri, FEATURE, "label", SAE, SCORE)


@pytest.fixture(scope="module")
def digits_job(
    digits: tuple[str, SingleProcessScores], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Storage, Any, list[tuple[str, int, int]]]:
    """One S = 4 pipeline run on digits: its storage, result and progress reports."""
    uri, _ = digits
    storage = Storage(str(tmp_path_factory.mktemp("digits-job")))
    seen: list[tuple[str, int, int]] = []
    result = _score(
        storage,
        uri,
        num_shards=4,
        on_progress=lambda *a: seen.append(a),
    )
    return storage, result, seen


def _wait_released(timeout: float = 10.0) -> dict[str, float]:
    """Ray's free resources once every CPU is back (placement group removal is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        free = ray.available_resources()
        if free.get("CPU", 0.0) >= ray.cluster_resources()["CPU"] or time.monotonic() > deadline:
            return free
        time.sleep(0.1)


def _assert_same_scores(result: Any, ref: SingleProcessScores) -> None:
    r, d = result.scores()
    np.testing.assert_allclose(r, ref.R, rtol=0, atol=1e-12)
    np.testing.assert_allclose(d, ref.D, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(result.p, ref.p)
    np.testing.assert_array_equal(result.labels(), ref.labels)


def _assert_same_selections(result: Any, ref: SingleProcessScores) -> None:
    shards = SelectionShards.start(result.plan, result.storage, "label", k=SAE.k)
    try:
        for config in POLICIES:
            shards.attach(make_policy(config))
            # small bins and cap force several histogram rounds and the tie refinement
            engine = SelectionEngine(make_policy(config), shards.broadcast(), bins=8, cap=16)
            single = SingleProcessSelector(make_policy(config), ref.shard_data())
            for _ in range(config.epochs):
                got, want = engine.step(), single.step()
                np.testing.assert_array_equal(got.indices, want.indices)
                assert got.stats["coverage"] == want.stats["coverage"]
                assert got.stats["class_counts"] == want.stats["class_counts"]
    finally:
        shards.shutdown()


def test_four_shards_equal_single_process_on_digits(
    digits: tuple[str, SingleProcessScores], digits_job: tuple[Storage, Any, list]
) -> None:
    _, ref = digits
    storage, result, seen = digits_job
    assert result.plan.num_shards == 4 and result.num_samples == ref.R.shape[0]
    _assert_same_scores(result, ref)
    np.testing.assert_array_equal(result.codes().ids, ref.codes.ids)
    _assert_same_selections(result, ref)
    # progress: phases in order, each ending at done == total
    phases = [p for p, _, _ in seen]
    order = ["queued", "featurizing", "training_sae", "encoding", "scoring", "ready"]
    assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p] == order
    for phase in order[1:]:
        last = [(d, t) for p, d, t in seen if p == phase][-1]
        assert last[0] == last[1] > 0
    # outputs per docs/architecture.md; no features are stored
    for s in range(4):
        assert sorted(storage.list_dir(shard_dir(s))) == [
            "codes.npz",
            "counts.npy",
            "encoding.json",
            "labels.npy",
            "scores.npz",
        ]
    assert storage.exists("factors.npy") and storage.exists("features/extractor.npz")
    assert sorted(storage.list_dir("sae")) == ["sae.json", "sae.safetensors"]
    state = storage.read_json("pipeline.json")
    assert state["phases_done"] == order[1:] and state["failed"] is None
    # the run reserved two 1-CPU workers while it scored, and gave them back
    assert result.resources == {"CPU": 2.0}
    assert state["encoding"]["attempts"] == [1, 1, 1, 1]
    assert state["encoding"]["devices"] == ["cpu"]
    assert _wait_released()["CPU"] == ray.cluster_resources()["CPU"]


def _rank01(x: np.ndarray) -> np.ndarray:
    """Mean 0-based rank / (N - 1), ties sharing the mean: written out with argsort."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.shape[0], dtype=np.float64)
    xs = x[order]
    start = 0
    while start < xs.shape[0]:
        stop = start
        while stop + 1 < xs.shape[0] and xs[stop + 1] == xs[start]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2.0
        start = stop + 1
    return ranks / (x.shape[0] - 1)


def test_sharded_scores_follow_the_documented_formulas(
    digits_job: tuple[Storage, Any, list],
) -> None:
    """R and D of the S = 4 run against docs/architecture.md's formulas, computed here per row
    from the stored codes: p_j, profiles a_i over alive units, R_i = sum a_ij p_j / max p,
    D_i = sum a_ij w_j with w_j = log(1/p_j) min-max scaled, then average ranks."""
    _, result, _ = digits_job
    codes = result.codes()
    ids, vals = codes.ids, codes.values.astype(np.float64)
    n, units = ids.shape[0], SAE.units
    counts = np.zeros(units, dtype=np.int64)
    for i in range(n):
        for j, v in zip(ids[i], vals[i], strict=True):
            if v > 0:
                counts[j] += 1
    p = counts / n
    np.testing.assert_array_equal(result.p, p)
    alive = p > 0
    logw = np.where(alive, -np.log(np.where(alive, p, 1.0)), 0.0)
    lo, hi = logw[alive].min(), logw[alive].max()
    w = np.where(alive, (logw - lo) / (hi - lo), 0.0)
    raw_r, raw_d = np.zeros(n), np.zeros(n)
    for i in range(n):
        mass = sum(v for j, v in zip(ids[i], vals[i], strict=True) if v > 0 and alive[j])
        for j, v in zip(ids[i], vals[i], strict=True):
            if v > 0 and alive[j] and mass > 0:
                raw_r[i] += v / mass * p[j] / p.max()
                raw_d[i] += v / mass * w[j]
    r, d = result.scores()
    # the per-row sums above add in another order than the vectorized code: compare the raw
    # scores to float tolerance, the ranks of the stored raw scores exactly
    stored_raw = [result.storage.child(shard_dir(s)).read_npz("scores.npz") for s in range(4)]
    np.testing.assert_allclose(np.concatenate([z["R_raw"] for z in stored_raw]), raw_r, rtol=1e-12)
    np.testing.assert_allclose(np.concatenate([z["D_raw"] for z in stored_raw]), raw_d, rtol=1e-12)
    np.testing.assert_array_equal(r, _rank01(np.concatenate([z["R_raw"] for z in stored_raw])))
    np.testing.assert_array_equal(d, _rank01(np.concatenate([z["D_raw"] for z in stored_raw])))
    # and the ranks track the hand-computed scores: a higher raw score never ranks lower
    assert np.all(np.diff(r[np.argsort(raw_r, kind="stable")]) >= -1e-12)


def test_four_shards_equal_single_process_on_fashion_mnist(fmnist_uri: str, tmp_path: Path) -> None:
    uri = fmnist_uri
    ref = score_single_process(uri, FEATURE, "label", SAE, SCORE)
    result = _score(Storage(str(tmp_path / "job")), uri, num_shards=4)
    assert result.plan.num_shards == 4
    _assert_same_scores(result, ref)
    _assert_same_selections(result, ref)


def test_threshold_protocol_over_state_actors_equals_argpartition(tmp_path: Path) -> None:
    """S = 1..8 actors, heavy ties (4 distinct R and D values), several m, tiny bins and cap."""
    rng = np.random.default_rng(7)
    n = 8 * 37 + 5
    pq.write_table(pa.table({"x": np.arange(n)}), tmp_path / "x.parquet")
    plan = plan_shards(str(tmp_path / "x.parquet"), 8)
    storage = Storage(str(tmp_path / "job"))
    r_all = rng.integers(0, 4, n) / 4.0
    d_all = rng.integers(0, 4, n) / 4.0
    for s in plan.shards:
        storage.child(shard_dir(s.shard_id)).write_npz(
            "scores.npz", R=r_all[s.lo : s.hi], D=d_all[s.lo : s.hi], labels=np.empty(0)
        )
    shards = SelectionShards.start(plan, storage, None)
    actors = shards.actors
    policy = make_policy(PolicyConfig("factor", 0.5, 2, seed=3))
    shards.attach(policy, with_codes=False)
    try:
        for num in range(1, 9):
            part = actors[:num]
            hi = plan.shards[num - 1].hi

            def broadcast(method: str, *args: Any, part: list = part) -> list[Any]:
                return ray.get([a.call.remote(method, *args) for a in part])

            whole = SelectionShard(ShardData(0, hi, R=r_all[:hi], D=d_all[:hi]), policy)
            for m in sorted({1, hi // 7, hi // 2, hi - 1, int(rng.integers(1, hi))}):
                ctx = policy.context(0, broadcast("begin_epoch", 0), None)
                for _ in range(policy.stat_rounds - 1):
                    ctx = policy.context(0, broadcast("local_stats", 0, ctx), ctx)
                stage = Stage(policy.stages(0, ctx)[0].key, m)
                broadcast("begin_stage", stage, 0, ctx)
                trace = global_top_m(broadcast, m, bins=64, cap=3)
                got = np.concatenate([p["indices"] for p in broadcast("finish", 0, ctx)])

                whole.begin_epoch(0)
                whole.begin_stage(stage, 0, ctx)
                want = np.sort(top_m(whole.stage_scores(), whole.tiebreak_local, m))
                np.testing.assert_array_equal(got, want)
                assert trace.taken == m
    finally:
        shards.shutdown()


def test_scoring_worker_killed_mid_encoding_is_retried_and_gives_the_same_result(
    digits: tuple[str, SingleProcessScores], tmp_path: Path
) -> None:
    """SIGKILL the process encoding shard 1 once it has encoded 128 of its rows (a point read
    from its attempt record, not a sleep); Ray retries the task, and the job's record shows the
    interrupted attempt and the second one."""
    uri, ref = digits
    storage = Storage(str(tmp_path / "job"))
    record = storage.child(shard_dir(1))
    opts = PipelineOptions(encode_batch_size=64, encode_pause_s=0.05, max_task_retries=2)
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = _score(storage, uri, num_shards=2, options=opts)
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        if record.exists("encoding.json"):
            rec = record.read_json("encoding.json")
            if rec["attempt"] == 1 and rec["rows_done"] >= 128 and not rec["done"]:
                victim = rec["pid"]
                os.kill(victim, signal.SIGKILL)
        time.sleep(0.01)
    thread.join(timeout=300)
    assert victim is not None, "shard 1 was never seen mid-encoding"
    assert "error" not in out, out.get("error")
    result = out["result"]
    state = storage.read_json("pipeline.json")
    assert state["failed"] is None
    assert state["encoding"]["attempts"][1] == 2  # interrupted once, then resumed to the end
    (interrupted,) = state["encoding"]["interrupted_at"][1]
    assert 128 <= interrupted < result.plan.shards[1].num_rows
    assert result.encoding_records()[1]["pid"] != victim
    _assert_same_scores(result, ref)


def test_rerun_skips_done_shards_and_ignores_half_written_files(
    digits: tuple[str, SingleProcessScores], digits_job: tuple[Storage, Any, list], tmp_path: Path
) -> None:
    uri, ref = digits
    src, _, _ = digits_job
    root = tmp_path / "job"
    shutil.copytree(src.path(), root)
    storage = Storage(str(root))
    # a crash while shard 1 was writing: its outputs are gone, debris of atomic writes remains
    shard1 = storage.child(shard_dir(1))
    for name in ("codes.npz", "counts.npy", "scores.npz"):
        shard1.delete(name)
        (root / shard_dir(1) / f".{name}.tmp-{uuid.uuid4().hex}").write_bytes(b"garbage")
    storage.child(shard_dir(3)).delete("scores.npz")
    stamp = os.stat(root / shard_dir(0) / "codes.npz").st_mtime_ns
    result = _score(storage, uri)
    assert result.plan.num_shards == 4  # the stored plan is reused
    _assert_same_scores(result, ref)
    assert os.stat(root / shard_dir(0) / "codes.npz").st_mtime_ns == stamp  # not recomputed
    assert {"codes.npz", "counts.npy", "scores.npz"} <= set(shard1.list_dir())
    assert storage.read_json("pipeline.json")["encoding"]["attempts"] == [1, 2, 1, 1]


def test_a_fully_scored_storage_reattaches_without_reserving(
    digits: tuple[str, SingleProcessScores], digits_job: tuple[Storage, Any, list], tmp_path: Path
) -> None:
    """A restarted service re-attaches to stored scores even when the cluster is full."""
    uri, ref = digits
    src, _, _ = digits_job
    shutil.copytree(src.path(), tmp_path / "job")
    hog = ray.util.placement_group([{"CPU": 2.0}])  # every CPU of the cluster
    ray.get(hog.ready())
    try:
        seen: list[str] = []
        result = _score(
            Storage(str(tmp_path / "job")),
            uri,
            on_progress=lambda ph, d, t: seen.append(ph),
            resources=ScoringResources(placement_timeout_s=1),
        )
    finally:
        ray.util.remove_placement_group(hog)
    assert seen == ["ready"] and result.resources == {}
    _assert_same_scores(result, ref)


def test_unplaceable_scoring_fails_in_time_naming_the_resource(
    digits: tuple[str, SingleProcessScores], tmp_path: Path
) -> None:
    """4 GPUs asked of a cluster without any: queued with the reason, then a clear failure."""
    uri, _ = digits
    storage = Storage(str(tmp_path / "job"))
    reasons: list[str | None] = []
    t0 = time.monotonic()
    with pytest.raises(ScoringError, match=r"GPU: needs 4, the cluster has 0") as info:
        _score(
            storage,
            uri,
            resources=ScoringResources(gpus=4, placement_timeout_s=2),
            on_wait=reasons.append,
            options=PipelineOptions(poll_s=0.2),
        )
    assert time.monotonic() - t0 < 30
    assert info.value.phase == "queued"
    assert reasons and "4 x {CPU: 0.25, GPU: 1}" in str(reasons[0])
    assert storage.read_json("pipeline.json")["failed"]["phase"] == "queued"
    assert _wait_released()["CPU"] == ray.cluster_resources()["CPU"]

    def cancel(reason: str | None) -> None:  # what the job manager does for a deleted job
        raise RuntimeError("job deleted")

    with pytest.raises(ScoringError, match="job deleted"):
        _score(
            storage,
            uri,
            resources=ScoringResources(gpus=4),  # would wait an hour: the cancel ends it
            on_wait=cancel,
            options=PipelineOptions(poll_s=0.2),
        )
    assert time.monotonic() - t0 < 60
    assert not ray.util.placement_group_table() or all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()
    )


def _write_ragged(path: Path) -> str:
    """A dataset whose second file's image column is ragged (a corrupted input)."""
    path.mkdir()
    rows = [[1.0, 2.0, 3.0]] * 40
    pq.write_table(pa.table({"image": rows, "label": [0] * 40}), path / "a.parquet")
    bad = [[1.0, 2.0, 3.0]] * 39 + [[1.0, 2.0]]
    pq.write_table(pa.table({"image": bad, "label": [1] * 40}), path / "b.parquet")
    return str(path)


def test_unretriable_failure_marks_the_pipeline_failed(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "job"))
    uri = _write_ragged(tmp_path / "ragged")
    with pytest.raises(ScoringError, match="ragged") as info:
        _score(storage, uri, num_shards=2)
    assert info.value.phase == "featurizing"
    state = storage.read_json("pipeline.json")
    assert state["failed"]["phase"] == "featurizing" and "ragged" in state["failed"]["error"]
    assert not storage.exists("features/extractor.npz")
    assert _wait_released()["CPU"] == ray.cluster_resources()["CPU"]  # the failure frees it all
    assert not any(storage.child("shards").list_dir(d) for d in storage.list_dir("shards"))
    # the error survives pickling (it crosses process boundaries)
    again = ray.get(ray.put(info.value))
    assert isinstance(again, ScoringError) and again.phase == "featurizing"
    assert str(again) == str(info.value)


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "job"))

    def run(uri: str, **kw: Any) -> None:
        _score(storage, uri, num_shards=2, **kw)

    with pytest.raises(ScoringError, match="does not exist"):
        run(str(tmp_path / "missing.parquet"))
    (tmp_path / "notes.parquet").write_text("not parquet")
    with pytest.raises(ScoringError, match="not a Parquet file"):
        run(str(tmp_path / "notes.parquet"))
    pq.write_table(pa.table({"image": [[1.0]], "label": [0]}), tmp_path / "ok.parquet")
    pq.write_table(pa.table({"image": [[1.0]]}), tmp_path / "nolabel.parquet")
    with pytest.raises(ScoringError, match=r"\['label'\] not in dataset"):
        run(str(tmp_path / "nolabel.parquet"))
    empty = pa.table(
        {"image": pa.array([], pa.list_(pa.float32())), "label": pa.array([], "int64")}
    )
    pq.write_table(empty, tmp_path / "empty.parquet")
    with pytest.raises(ScoringError, match="empty"):
        run(str(tmp_path / "empty.parquet"))
    with pytest.raises(ScoringError, match="outside the allowed roots"):
        run(str(tmp_path / "ok.parquet"), allowed_roots=[str(tmp_path / "data")])
    assert json.loads((tmp_path / "job" / "pipeline.json").read_text())["failed"]["phase"] == (
        "pending"
    )


def test_state_actor_works_without_ray(
    digits: tuple[str, SingleProcessScores], digits_job: tuple[Storage, Any, list]
) -> None:
    """The plain class answers from the stored outputs (what a restarted actor does)."""
    _, ref = digits
    storage, result, _ = digits_job
    spec = result.plan.shards[1]
    actor = SelectionStateActor(spec, storage, "label")
    data = actor.shard_data()
    np.testing.assert_array_equal(data.R, ref.R[spec.lo : spec.hi])
    np.testing.assert_array_equal(data.labels, ref.labels[spec.lo : spec.hi])
    np.testing.assert_array_equal(data.code_ids, ref.codes.ids[spec.lo : spec.hi])
    with pytest.raises(ValueError, match="no selection state"):
        actor.call("info")
    assert actor.attach(make_policy(POLICIES[0])) == spec.num_rows
    assert actor.call("info") == (spec.lo, spec.hi)
    assert actor.memory_bytes()["R"] == 8 * spec.num_rows
    with pytest.raises(ValueError, match="private"):
        actor.call("_window", 0, 1)
    # a policy that reads no scores: labels straight from the dataset, no storage
    bare = SelectionStateActor(spec, None, "label").shard_data()
    assert bare.R is None and bare.code_ids is None
    np.testing.assert_array_equal(bare.labels, ref.labels[spec.lo : spec.hi])


def test_sae_data_parallel_on_two_workers(digits: tuple[str, SingleProcessScores]) -> None:
    """The one TorchTrainer run of the suite: 2 CPU workers, DDP over sae_train_step."""
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(24, 16))  # sparse data: 3 of 24 atoms per row
    coef = rng.random((1200, 24)) * (rng.random((1200, 24)) < 3 / 24)
    feats = (coef @ atoms).astype(np.float32)
    config = SAEConfig(units=64, k=4, epochs=6, batch_size=100, seed=5)
    for epoch in range(2):  # every worker runs the same number of equal-size steps
        steps = global_batches(feats.shape[0], config, epoch, 2)
        assert all(len(s) == 2 and abs(len(s[0]) - len(s[1])) <= 1 for s in steps)
        assert np.array_equal(
            np.sort(np.concatenate([np.concatenate(s) for s in steps])), np.arange(1200)
        )
    model = train_sae_distributed(feats, config, num_workers=2, cpus_per_worker=0.5)
    init = init_sae(feats, config)
    np.testing.assert_array_equal(model.mean_D.numpy(), init.mean_D.numpy())
    x = torch.from_numpy(feats)
    with torch.no_grad():
        trained_mse = float(model(x).mse)
        init_mse = float(init(x).mse)
    assert trained_mse < 0.75 * init_mse
    norms = model.W_dec.detach().norm(dim=1).numpy()
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
