"""End to end: Ray Train workers pull their per-epoch subsets over HTTP from a running service.

One TorchTrainer.fit with 2 CPU workers on a 2000-row Fashion-MNIST subset, 2 epochs. Every
worker logs the dataset indices its DataLoader actually yielded; the test checks that, per epoch,
the ranks' indices are disjoint, equal in number and together exactly the epoch's subset.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from client import SelectionClient
from service.server import ServiceHandle, start_service
from service.settings import Settings
from tests.optional import requires_fashion_mnist
from workers.datasets import write_image_parquet

# without the data: a skip that names the install command (not a FileNotFoundError)
pytestmark = [pytest.mark.ray, pytest.mark.slow, requires_fashion_mnist]

ROWS = 2000
EPOCHS = 2
WORKERS = 2


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    train, _ = write_image_parquet(root / "fmnist", "fashion-mnist")
    path = root / "fmnist" / f"train_{ROWS}.parquet"
    pq.write_table(pq.read_table(train).slice(0, ROWS), path, row_group_size=500)
    return path


@pytest.fixture(scope="module")
def service(ray_local: None, subset: Path) -> Iterator[ServiceHandle]:
    settings = Settings(
        host="127.0.0.1",
        port=0,
        store=str(subset.parent / "store"),
        allowed_roots=[str(subset.parent)],
    )
    handle = start_service(settings, name=None)
    yield handle
    handle.stop()


def _loop(config: dict[str, Any]) -> None:
    """Ray Train worker: train a linear model on the rank's subset, log the indices used."""
    import ray.train
    import torch
    import torch.nn.functional as F
    from ray.train.torch import prepare_model
    from torch.utils.data import DataLoader, Dataset

    from client import SelectionClient
    from client.ray_train import sampler_from_context
    from workers.datasets import load_image_parquet

    x, y = load_image_parquet(config["train"])
    xs = torch.from_numpy(x.astype(np.float32) / 255.0)
    ys = torch.from_numpy(y)

    class Indexed(Dataset):
        def __len__(self) -> int:
            return xs.shape[0]

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
            return xs[i], ys[i], i

    with torch.random.fork_rng():
        torch.manual_seed(0)  # scoped: the model init only
        model = prepare_model(torch.nn.Linear(xs.shape[1], 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = sampler_from_context(SelectionClient(config["url"]), config["job_id"])
    rank = ray.train.get_context().get_world_rank()
    log: dict[int, list[int]] = {}
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        used: list[int] = []
        for xb, yb, ib in DataLoader(Indexed(), batch_size=100, sampler=sampler):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            used.extend(ib.tolist())
        log[epoch] = used
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(log))


def test_ray_train_workers_use_exactly_the_epoch_subset(
    service: ServiceHandle, subset: Path, tmp_path: Path
) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    client = SelectionClient(service.url)
    spec = {
        "name": "e2e",
        "dataset": {
            "uri": str(subset),
            "label_column": "label",
            "feature": {"kind": "pixels", "column": "image", "dim": 32},
        },
        "policy": {"name": "factor", "ratio": 0.5, "epochs": EPOCHS, "seed": 1},
        "sae": {"units": 128, "k": 8, "epochs": 3, "batch_size": 512},
    }
    job = client.create_job(spec)["id"]
    assert client.wait_ready(job, timeout=300, poll=0.2)["phase"] == "ready"
    out = tmp_path / "logs"
    out.mkdir()
    trainer = TorchTrainer(
        _loop,
        train_loop_config={
            "url": service.url,
            "job_id": job,
            "train": str(subset),
            "out": str(out),
        },
        scaling_config=ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": 0.9}),
        run_config=RunConfig(name="e2e", storage_path=str(tmp_path / "ray")),
    )
    trainer.fit()

    logs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORKERS)]
    for epoch in range(EPOCHS):
        subset_t = client.indices(job, epoch, 0, 1)
        assert subset_t.size == ROWS // 2
        used = [logs[r][str(epoch)] for r in range(WORKERS)]
        assert len(used[0]) == len(used[1]) == subset_t.size // WORKERS
        assert not set(used[0]) & set(used[1])
        assert set(used[0]) | set(used[1]) == set(subset_t.tolist())
    assert not np.array_equal(client.indices(job, 0, 0, 1), client.indices(job, 1, 0, 1))
