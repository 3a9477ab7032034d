"""The selection service on local Ray, over HTTP: serving, restarts, determinism, bad input.

One local Ray for the module. Jobs score scikit-learn digits (1797 rows) with a small SAE, so a
job is ready in seconds; every test talks to a real uvicorn server inside a SelectionActor.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import ray
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from saelect.client import SelectionClient, SelectionSampler
from saelect.client.feedback import post_feedback
from saelect.service.server import ServiceHandle, start_service
from saelect.service.settings import Settings
from saelect.workers.datasets import write_image_parquet
from schemathesis import GenerationMode

from tests.bad_requests import bad_requests
from tests.fuzz import aim_at_a_job, fuzz_config

pytestmark = pytest.mark.ray

EPOCHS = 20


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("svc")
    write_image_parquet(root / "digits", "digits")
    return root


def _spec(data_dir: Path, **policy: Any) -> dict[str, Any]:
    pol = {"name": "factor", "ratio": 0.3, "epochs": EPOCHS, "seed": 3, "params": {}}
    pol.update(policy)
    return {
        "name": "digits-factor",
        "dataset": {
            "uri": str(data_dir / "digits" / "train.parquet"),
            "label_column": "label",
            "feature": {"kind": "pixels", "column": "image", "dim": 32},
        },
        "policy": pol,
        "sae": {"units": 128, "k": 8, "epochs": 5, "batch_size": 512, "seed": 0},
    }


def _start(data_dir: Path, store: str, port: int = 0, **kw: Any) -> ServiceHandle:
    settings = Settings(
        host="127.0.0.1", port=port, store=store, allowed_roots=[str(data_dir)], **kw
    )
    return start_service(settings, name=None)


@pytest.fixture(scope="module")
def service(ray_local: None, data_dir: Path) -> Iterator[ServiceHandle]:
    handle = _start(data_dir, str(data_dir / "store-main"))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def ready_job(service: ServiceHandle, data_dir: Path) -> tuple[SelectionClient, str]:
    client = SelectionClient(service.url)
    job = client.create_job(_spec(data_dir))
    assert job["phase"] == "pending"
    status = client.wait_ready(job["id"], timeout=300, poll=0.2)
    assert status["phase"] == "ready", status
    return client, job["id"]


def _epochs(client: SelectionClient, job: str, upto: int = EPOCHS) -> list[np.ndarray]:
    return [client.indices(job, t, 0, 1) for t in range(upto)]


def test_job_status_reports_samples_and_phase(ready_job: tuple[SelectionClient, str]) -> None:
    client, job = ready_job
    status = client.job(job)
    assert status["num_samples"] > 1000
    assert status["error"] is None
    assert job in [j["id"] for j in client.jobs()]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_cover_the_epoch_with_equal_lengths(
    ready_job: tuple[SelectionClient, str], world_size: int
) -> None:
    client, job = ready_job
    plan = client.plan(job, world_size)
    for t in range(EPOCHS):
        epoch = client.indices(job, t, 0, 1)
        assert epoch.size == plan["epochs"][t]["size"] == np.unique(epoch).size
        ranks = [client.indices(job, t, r, world_size) for r in range(world_size)]
        assert {r.size for r in ranks} == {plan["epochs"][t]["per_rank"]}
        assert set(np.concatenate(ranks).tolist()) == set(epoch.tolist())
        # padding repeats the head of the epoch order, exactly as the partition rule says
        merged = np.empty(world_size * ranks[0].size, dtype=np.int64)
        for r in range(world_size):
            merged[r::world_size] = ranks[r]
        assert np.array_equal(merged[: epoch.size], epoch)


def test_binary_and_json_agree_and_repeats_change_nothing(
    ready_job: tuple[SelectionClient, str],
) -> None:
    client, job = ready_job
    before = [client.stats(job, t) for t in range(EPOCHS)]
    for t in (0, 7, EPOCHS - 1):
        for rank in range(2):
            a = client.indices(job, t, rank, 2)
            b = client.indices(job, t, rank, 2, as_json=True)
            c = client.indices(job, t, rank, 2)
            assert np.array_equal(a, b) and np.array_equal(a, c)
    after = [client.stats(job, t) for t in range(EPOCHS)]
    assert before == after
    assert client.job(job)["epochs_committed"] == EPOCHS
    assert before[-1]["coverage"] >= before[0]["coverage"]
    assert set(before[0]) >= {"epoch", "lambda", "size", "coverage", "usage", "factor_coverage"}


def test_restart_and_actor_kill_resume_identically(
    ray_local: None, data_dir: Path, ready_job: tuple[SelectionClient, str]
) -> None:
    """Epochs served before a stop come back identical; later ones equal an uninterrupted run.

    The reference is the module's job (same spec, another store, never interrupted), which also
    shows that the same spec on a fresh store gives the same epochs. The restarted service of 1)
    is the one whose actor 2) kills, with a second job of the spec (its scoring loaded from the
    store, so the module scores one store more, not two).
    """
    ref_client, ref_job = ready_job
    reference = _epochs(ref_client, ref_job)

    # 1) stop the service after epoch 7 was served, start a new one on the same store
    store = str(data_dir / "store-restart")
    svc = _start(data_dir, store)
    client = SelectionClient(svc.url)
    job = client.create_job(_spec(data_dir))["id"]
    client.wait_ready(job, timeout=300, poll=0.2)
    first = _epochs(client, job, 8)
    svc.stop()
    svc = _start(data_dir, store, port=_free_port())  # a fixed port: the actor comes back on it
    client = SelectionClient(svc.url, retries=30, backoff=0.2)
    assert client.wait_ready(job, timeout=300, poll=0.2)["epochs_committed"] == 8
    again = _epochs(client, job)
    for t in range(8):
        assert np.array_equal(first[t], again[t]), t
    for t in range(EPOCHS):
        assert np.array_equal(again[t], reference[t]), t

    # 2) ray.kill the SelectionActor (Ray restarts it on the same port and store)
    job = client.create_job(_spec(data_dir))["id"]
    client.wait_ready(job, timeout=300, poll=0.2)
    first = _epochs(client, job, 8)
    pid = ray.get(svc.actor.info.remote())["pid"]
    ray.kill(svc.actor, no_restart=False)
    for _ in range(600):  # wait until the restarted instance (a new process) serves
        try:
            info = ray.get(svc.actor.info.remote(), timeout=120)
            if info["pid"] != pid:
                assert info["url"] == svc.url
                break
        except ray.exceptions.ActorUnavailableError:
            pass
        time.sleep(0.1)
    else:
        raise AssertionError("the SelectionActor did not come back")
    status = client.wait_ready(job, timeout=300, poll=0.2)
    assert status["epochs_committed"] == 8
    again = _epochs(client, job)
    svc.stop()
    for t in range(EPOCHS):
        assert np.array_equal(again[t], reference[t]), t


def _error(resp: httpx.Response) -> tuple[int, str]:
    """(status, code) of an error answer, after checking its documented shape."""
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return resp.status_code, body["error"]["code"]


def test_each_bad_input_gets_its_one_documented_status(
    service: ServiceHandle, data_dir: Path, ready_job: tuple[SelectionClient, str]
) -> None:
    """The shared table of bad requests (tests/bad_requests.py, also walked by the route unit
    tests) against the real service: exactly the status and code of docs/api.md's table."""
    _, job = ready_job
    url = f"{service.url}/v1/jobs"
    with httpx.Client(timeout=30) as http:
        for bad in bad_requests(job, epochs=EPOCHS, spec=_spec(data_dir)):
            resp = http.request(
                bad.method,
                f"{service.url}{bad.path}",
                params=bad.params,
                json=bad.json,
                headers=bad.headers,
                content=bad.content,
            )
            assert _error(resp) == (bad.status, bad.code), (bad.label, resp.text)
            assert bad.fragment in resp.json()["error"]["message"].lower(), (bad.label, resp.text)

        spec = _spec(data_dir)
        bad_specs = [
            {**spec, "policy": {**spec["policy"], "ratio": 0.0}},
            {**spec, "policy": {**spec["policy"], "ratio": 1.5}},
            {**spec, "dataset": {**spec["dataset"], "uri": str(data_dir / ".." / "x.parquet")}},
            {**spec, "dataset": {**spec["dataset"], "uri": "/etc/passwd"}},
            {
                **spec,
                "dataset": {
                    **spec["dataset"],
                    "feature": {"kind": "module", "column": "image", "module": "os:getcwd"},
                },
            },
        ]
        for body in bad_specs:
            assert _error(http.post(url, json=body)) == (400, "invalid_request"), body
        malformed = http.post(
            url, content=b"{not json", headers={"content-type": "application/json"}
        )
        assert _error(malformed) == (400, "malformed_json")
        huge = http.post(url, content=b"x" * (65 * 1024 * 1024))
        assert _error(huge) == (413, "payload_too_large")
        assert len(SelectionClient(service.url).jobs()) >= 1  # nothing lost


def test_loss_policy_takes_feedback_and_restarts_deterministically(
    service: ServiceHandle, data_dir: Path
) -> None:
    """ucb consumes losses between epochs; a restart replays the feedback log identically. The
    uninterrupted reference runs on the module's service (another store)."""
    spec = _spec(data_dir, name="ucb", epochs=6)
    store = str(data_dir / "store-ucb")
    svc = _start(data_dir, store)
    client = SelectionClient(svc.url)
    job = client.create_job(spec)["id"]
    client.wait_ready(job, timeout=300, poll=0.2)
    served = []
    for t in range(4):
        idx = client.indices(job, t, 0, 1)
        served.append(idx)
        losses = (idx % 7).astype(np.float32) / 7.0  # deterministic fake losses
        client.feedback(job, t, idx, losses)
    svc.stop()
    svc = _start(data_dir, store)
    client = SelectionClient(svc.url)
    client.wait_ready(job, timeout=300, poll=0.2)
    for t in range(4):
        assert np.array_equal(client.indices(job, t, 0, 1), served[t])
    resumed = client.indices(job, 4, 0, 1)
    svc.stop()
    # an uninterrupted run with the same feedback sequence picks the same epoch 4
    client = SelectionClient(service.url)
    job = client.create_job(spec)["id"]
    client.wait_ready(job, timeout=300, poll=0.2)
    for t in range(4):
        idx = client.indices(job, t, 0, 1)
        assert np.array_equal(idx, served[t])
        client.feedback(job, t, idx, (idx % 7).astype(np.float32) / 7.0)
    assert np.array_equal(client.indices(job, 4, 0, 1), resumed)


def test_shard_process_crash_mid_run_changes_no_epoch(
    service: ServiceHandle, data_dir: Path, ready_job: tuple[SelectionClient, str]
) -> None:
    """A ShardActor process killed between epochs is restarted by Ray; the next epochs are
    still those of the uninterrupted reference (the engine is rebuilt and replayed)."""
    ref_client, ref_job = ready_job
    reference = _epochs(ref_client, ref_job)
    client = SelectionClient(service.url)
    job = client.create_job(_spec(data_dir))["id"]  # same scoring key: loads, no recompute
    client.wait_ready(job, timeout=300, poll=0.2)
    served = _epochs(client, job, 5)
    shards = ray.get(service.actor.shard_info.remote(job))
    os.kill(shards[0]["pid"], signal.SIGKILL)
    rest = [client.indices(job, t, 0, 1) for t in range(5, EPOCHS)]
    for t, idx in enumerate(served + rest):
        assert np.array_equal(idx, reference[t]), t
    assert ray.get(service.actor.shard_info.remote(job))[0]["pid"] != shards[0]["pid"]
    client.delete(job)
    assert job not in [j["id"] for j in client.jobs()]
    assert np.array_equal(ref_client.indices(ref_job, 3, 0, 1), reference[3])  # scoring kept


def test_ray_data_helper_selects_the_epoch_rows(
    ready_job: tuple[SelectionClient, str],
) -> None:
    from saelect.client.ray_data import select_epoch

    client, job = ready_job
    n = client.job(job)["num_samples"]
    ds = ray.data.range(n).map(lambda row: {"index": row["id"], "x": row["id"] * 2})
    subset = select_epoch(ds, client, job, 2)
    got = sorted(int(r["index"]) for r in subset.take_all())
    assert got == sorted(client.indices(job, 2, 0, 1).tolist())


def test_infobatch_weights_are_served_aligned_with_the_indices(
    service: ServiceHandle, data_dir: Path
) -> None:
    """Kept low-loss samples carry InfoBatch's rescaling weight; the rest weigh 1."""
    client = SelectionClient(service.url)
    job = client.create_job(_spec(data_dir, name="infobatch", ratio=0.5, epochs=4))["id"]
    client.wait_ready(job, timeout=300, poll=0.2)
    idx0 = client.indices(job, 0, 0, 1)
    losses = (idx0 % 10).astype(np.float32)  # below the mean (4.5) for idx % 10 < 5
    client.feedback(job, 0, idx0, losses)
    for rank in range(2):
        idx = client.indices(job, 1, rank, 2)
        w = client.weights(job, 1, rank, 2)
        assert w.shape == idx.shape
        low = np.isin(idx, idx0[losses < losses.mean()])
        assert np.all(w[~low] == 1.0)
        assert np.all(w[low] > 1.0) and low.any()
    client.delete(job)


def test_feedback_reporter_posts_each_loss_once_to_the_real_service(
    service: ServiceHandle, data_dir: Path
) -> None:
    """Keyed posts through the SelectionActor: two ranks report in batches with `sampler.report`,
    a repeated key is acknowledged without being applied, and the next epoch (indices and
    weights) equals that of a twin job given the same losses by plain posts."""
    client = SelectionClient(service.url)
    spec = _spec(data_dir, name="infobatch", ratio=0.5, epochs=3)
    keyed, plain = (client.create_job(spec)["id"] for _ in range(2))
    for job in (keyed, plain):
        client.wait_ready(job, timeout=300, poll=0.2)
    for rank in range(2):
        sampler = SelectionSampler(client, keyed, rank=rank, world_size=2)
        sampler.set_epoch(0)
        idx = sampler.indices()
        for b in range(0, idx.size, 64):
            sampler.report(torch.from_numpy(idx[b : b + 64]), (idx[b : b + 64] % 10) * 1.0)
        sampler.feedback.close()  # every post acknowledged (no epoch 1 asked for yet)
        assert sampler.feedback.posted == idx.size
        client.feedback(plain, 0, idx, (idx % 10).astype(np.float32))
    again = post_feedback(client, keyed, 0, idx[:64], np.zeros(64), rank=1, seq=0)
    assert again == {"epoch": 0, "count": 64, "duplicate": True}
    for rank in range(2):
        np.testing.assert_array_equal(
            client.indices(keyed, 1, rank, 2), client.indices(plain, 1, rank, 2)
        )
        np.testing.assert_array_equal(
            client.weights(keyed, 1, rank, 2), client.weights(plain, 1, rank, 2)
        )
    assert (client.weights(keyed, 1, 0, 2) > 1).any()
    for job in (keyed, plain):
        client.delete(job)


REAL_EXAMPLES = 6
"""Fuzzed cases per operation against the real service (the fake-backend run does more)."""


def test_schemathesis_against_the_real_service(
    service: ServiceHandle, ready_job: tuple[SelectionClient, str]
) -> None:
    """schemathesis on the SelectionActor's uvicorn, every operation of /openapi.json with a
    few positive and negative cases: no 5xx, every answer matches its schema; half the cases
    aim at the module's ready job (never a DELETE of it)."""
    config = fuzz_config(examples=REAL_EXAMPLES, seed=3, coverage=False)
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json", config=config)
    job = ready_job[1]
    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        cases = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        )

        @given(case=cases)
        @settings(
            max_examples=REAL_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            aim_at_a_job(case, [job])
            case.call_and_validate(timeout=60)

        check()
    assert len(labels) >= 10 and "GET /v1/jobs/{job_id}/epochs/{epoch}/indices" in labels


def test_ranks_fetching_while_their_job_is_deleted_get_an_answer_or_404(
    service: ServiceHandle, data_dir: Path
) -> None:
    """4 ranks (world size 4, each with its own connection) loop over the epochs of an `rs2`
    job while it is deleted: every answer is 200 (with the same bytes as the twin job's)
    or 404 `unknown_job`, never a 5xx and never a hang; a new job with the same spec then serves
    exactly the epochs the deleted one served."""
    spec = {**_spec(data_dir, name="rs2", ratio=0.5), "name": "deleted-while-fetched"}
    client = SelectionClient(service.url)
    job = client.create_job(spec)["id"]
    assert client.wait_ready(job, timeout=300, poll=0.2)["phase"] == "ready"
    world = 4
    served: dict[tuple[int, int], bytes] = {}
    statuses: list[tuple[int, str]] = []
    started = threading.Barrier(world + 1)
    lock = threading.Lock()

    def rank_loop(rank: int) -> None:
        with httpx.Client(base_url=service.url, timeout=60) as http:
            started.wait()
            for t in itertools.cycle(range(EPOCHS)):
                resp = http.get(
                    f"/v1/jobs/{job}/epochs/{t}/indices",
                    params={"rank": rank, "world_size": world},
                    headers={"Accept": "application/octet-stream"},
                )
                code = resp.json()["error"]["code"] if resp.status_code != 200 else ""
                with lock:
                    statuses.append((resp.status_code, code))
                    if resp.status_code == 200:
                        assert served.setdefault((t, rank), resp.content) == resp.content
                if resp.status_code != 200:
                    return

    threads = [threading.Thread(target=rank_loop, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    started.wait()
    deadline = time.monotonic() + 60
    while len(statuses) < 4 * world and time.monotonic() < deadline:
        time.sleep(0.01)  # some epochs served before the delete
    client.delete(job)
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a rank hung on a deleted job"
    assert {s for s, _ in statuses} <= {200, 404}, sorted(set(statuses))
    assert statuses.count((404, "unknown_job")) == world  # each rank ends on its 404
    assert len(served) >= 4 * world - world  # most fetches before the delete were answered
    twin = client.create_job(spec)["id"]
    assert client.wait_ready(twin, timeout=300, poll=0.2)["phase"] == "ready"
    for (t, rank), body in served.items():
        again = client.indices(twin, t, rank, world)
        assert np.array_equal(np.frombuffer(body, dtype="<i8"), again), (t, rank)
    client.delete(twin)


def test_a_new_job_computes_its_first_epoch_before_any_request(
    service: ServiceHandle, data_dir: Path, ready_job: tuple[SelectionClient, str]
) -> None:
    """A ready job whose policy takes no feedback commits epoch 0 on its own (the trainers'
    first fetch then finds it in memory), and it is the epoch a request would have computed;
    a feedback policy's job waits for its first request."""
    ref_client, ref_job = ready_job
    client = SelectionClient(service.url)
    job = client.create_job(_spec(data_dir))["id"]  # the same spec as ready_job's
    ucb = client.create_job(_spec(data_dir, name="ucb"))["id"]
    for j in (job, ucb):
        assert client.wait_ready(j, timeout=300, poll=0.2)["phase"] == "ready"
    deadline = time.monotonic() + 60
    while client.job(job)["epochs_committed"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.job(job)["epochs_committed"] == 1  # epoch 0 only, with no request made
    assert client.job(ucb)["epochs_committed"] == 0
    assert np.array_equal(client.indices(job, 0, 0, 1), ref_client.indices(ref_job, 0, 0, 1))
    for j in (job, ucb):
        client.delete(j)
