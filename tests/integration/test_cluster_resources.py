"""Resources follow the work: a ready job holds no CPU or GPU, and a full cluster queues jobs.

Each GPU count gets its own private local Ray (the module fixture `service`, parametrized by the
count: 1 and 3 GPUs with one ready `factor` job each, the 3-GPU one shared by the trainer test;
0 GPUs for the five jobs), declaring GPUs as a logical resource on this CPU machine: the scoring
reserves them while it runs and picks its torch device from what the process really sees (the
CPU here).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from saelect.client import SelectionClient
from saelect.service.server import ServiceHandle, start_service
from saelect.service.settings import Settings
from saelect.workers.datasets import write_image_parquet
from saelect.workers.shard_plan import default_num_shards

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("res")
    write_image_parquet(root / "digits", "digits")
    return root


def _spec(data_dir: Path, name: str = "factor", sae_seed: int = 0, **params: Any) -> dict:
    return {
        "name": f"digits-{name}",
        "dataset": {
            "uri": str(data_dir / "digits" / "train.parquet"),
            "label_column": "label",
            "feature": {"kind": "pixels", "column": "image", "dim": 32},
        },
        "policy": {"name": name, "ratio": 0.3, "epochs": 4, "seed": 1, "params": params},
        "sae": {"units": 128, "k": 8, "epochs": 3, "batch_size": 512, "seed": sae_seed},
    }


@contextmanager
def cluster(data_dir: Path, store: str, *, num_gpus: int = 0) -> Iterator[ServiceHandle]:
    """A private local Ray with 2 CPUs and ``num_gpus`` logical GPUs, and the service on it."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=num_gpus,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=512 * 1024**2,
    )
    settings = Settings(
        host="127.0.0.1", port=0, store=str(data_dir / store), allowed_roots=[str(data_dir)]
    )
    handle = start_service(settings, name=None)
    try:
        yield handle
    finally:
        handle.stop()
        ray.shutdown()


@pytest.fixture(scope="module")
def service(request: pytest.FixtureRequest, data_dir: Path) -> Iterator[ServiceHandle]:
    """The service on a private local Ray with ``request.param`` logical GPUs (store
    ``store-gpu{n}``); pytest runs the tests of one GPU count together."""
    with cluster(data_dir, f"store-gpu{request.param}", num_gpus=request.param) as handle:
        yield handle


@pytest.fixture(scope="module")
def ready_factor_job(
    service: ServiceHandle, data_dir: Path
) -> tuple[SelectionClient, str, dict[str, Any]]:
    """(client, job id, status) of a `factor` job on ``service``, ready."""
    client = SelectionClient(service.url)
    job = client.create_job(_spec(data_dir))["id"]
    status = client.wait_ready(job, timeout=300, poll=0.2)
    assert status["phase"] == "ready", status
    return client, job, status


def _free_after_ready(timeout: float = 10.0) -> dict[str, float]:
    """Free resources once the scoring's placement group is gone (its removal is async)."""
    deadline = time.monotonic() + timeout
    total = ray.cluster_resources()
    while True:
        free = ray.available_resources()
        if free.get("GPU", 0.0) >= total.get("GPU", 0.0) and free.get("CPU", 0.0) >= 1.95:
            return free
        if time.monotonic() > deadline:
            return free
        time.sleep(0.1)


def _pipeline_state(data_dir: Path, store: str) -> dict[str, Any]:
    import json

    (path,) = (data_dir / store / "scoring").glob("*/pipeline.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("service", [1, 3], indirect=True, ids=["1", "3"])
def test_a_ready_factor_job_holds_no_gpu_and_almost_no_cpu(
    service: ServiceHandle,
    ready_factor_job: tuple[SelectionClient, str, dict[str, Any]],
    data_dir: Path,
) -> None:
    client, job, status = ready_factor_job
    num_gpus = int(ray.cluster_resources()["GPU"])
    shards = ray.get(service.actor.shard_info.remote(job))
    assert len(shards) == default_num_shards(2, num_gpus)  # the defaults' shard count
    free = _free_after_ready()
    assert free["GPU"] == num_gpus
    assert free["CPU"] >= 2 - 0.05
    state = _pipeline_state(data_dir, f"store-gpu{num_gpus}")
    # it scored on one logical GPU per worker, and ran torch on the CPU it really has
    assert state["resources"] == {"CPU": 0.25 * num_gpus, "GPU": float(num_gpus)}
    assert state["encoding"]["devices"] == ["cpu"]
    assert client.indices(job, 0, 0, 1).shape[0] == round(0.3 * status["num_samples"])


def _train_loop(config: dict[str, Any]) -> None:
    """Each rank pulls its subsets of two epochs from the live job and writes them down."""
    import json
    import os

    import ray.train
    from saelect.client import SelectionClient

    ctx = ray.train.get_context()
    client = SelectionClient(config["url"])
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    got = [client.indices(config["job"], t, rank, world).tolist() for t in range(2)]
    path = os.path.join(config["out"], f"rank{rank}.json")
    with open(path, "w") as f:
        json.dump({"world": world, "epochs": got, "gpus": ray.get_gpu_ids()}, f)


@pytest.mark.parametrize("service", [3], indirect=True, ids=["3"])
def test_a_trainer_takes_every_gpu_while_the_job_is_live(
    service: ServiceHandle,
    ready_factor_job: tuple[SelectionClient, str, dict[str, Any]],
    tmp_path: Path,
) -> None:
    """One Ray Train worker per logical GPU (3) pulls its share of two epochs of the live job."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    client, job, _ = ready_factor_job
    gpus = int(ray.cluster_resources()["GPU"])
    assert _free_after_ready()["GPU"] == gpus
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"url": service.url, "job": job, "out": str(tmp_path)},
        scaling_config=ScalingConfig(
            num_workers=gpus, use_gpu=True, resources_per_worker={"CPU": 0.5, "GPU": 1}
        ),
        torch_config=TorchConfig(backend="gloo"),  # no CUDA here: the GPUs are logical
        run_config=RunConfig(storage_path=str(tmp_path / "train"), name="pull"),
    )
    result = trainer.fit()
    assert result.error is None
    import json

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(gpus)]
    assert all(rep["world"] == gpus for rep in reports)
    assert sorted(g for rep in reports for g in rep["gpus"]) == list(range(gpus))  # all in use
    for t in range(2):
        pulled = [np.asarray(rep["epochs"][t]) for rep in reports]
        assert len({p.shape for p in pulled}) == 1  # equal lengths: DDP cannot hang
        assert set(np.concatenate(pulled).tolist()) == set(client.indices(job, t, 0, 1).tolist())


@pytest.mark.parametrize("service", [0], indirect=True, ids=["0"])
def test_five_jobs_at_once_on_a_full_cluster_all_become_ready(
    service: ServiceHandle, data_dir: Path
) -> None:
    """Two different scorings compete for the 2 CPUs, a third job shares one of them, two
    policies need no scores: every job is ready in the end, and a waiting job says why. A sixth
    job asks for GPUs the cluster lacks: it fails within its placement timeout, naming them."""
    specs = [
        _spec(data_dir, "factor"),
        _spec(data_dir, "factor", sampling="topm", class_quotas=False, dynamic_coverage=False),
        _spec(data_dir, "factor", sae_seed=1),  # another scoring key: its own scoring run
        _spec(data_dir, "rs2"),
        _spec(data_dir, "ucb"),
    ]
    impossible = {**_spec(data_dir, "factor", sae_seed=2), "scoring": {"gpus": 4}}
    impossible["scoring"]["placement_timeout_s"] = 5
    client = SelectionClient(service.url)
    jobs = [client.create_job(s)["id"] for s in specs]
    doomed = client.create_job(impossible)["id"]
    seen: dict[str, list[tuple[float, str, str | None]]] = {j: [] for j in jobs}
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        statuses = {s["id"]: s for s in client.jobs()}
        for j in jobs:
            s = statuses[j]
            seen[j].append((time.monotonic() - t0, s["phase"], s.get("reason")))
        if all(statuses[j]["phase"] in ("ready", "failed") for j in jobs):
            break
        time.sleep(0.05)
    final = {j: seen[j][-1][1] for j in jobs}
    assert set(final.values()) == {"ready"}, {j: seen[j][-1] for j in jobs}
    reasons = [r for j in jobs for _, phase, r in seen[j] if phase == "queued" and r]
    assert any("shares with" in r for r in reasons), reasons
    assert any("waits for 2 x {CPU: 1} to score" in r and "free" in r for r in reasons)

    def ready_at(j: str) -> float:
        return next(t for t, phase, _ in seen[j] if phase == "ready")

    # the score-free jobs did not wait for any scoring
    assert max(ready_at(jobs[3]), ready_at(jobs[4])) < min(ready_at(j) for j in jobs[:3])
    for j in jobs:
        for t in range(2):
            parts = [client.indices(j, t, r, 2) for r in range(2)]
            assert parts[0].shape == parts[1].shape
    failed = client.job(doomed)
    deadline = time.monotonic() + 60
    while failed["phase"] != "failed" and time.monotonic() < deadline:
        time.sleep(0.2)
        failed = client.job(doomed)
    assert failed["phase"] == "failed", failed
    assert "GPU: needs 4, the cluster has 0" in failed["error"]
    assert _free_after_ready()["CPU"] >= 2 - 0.05
