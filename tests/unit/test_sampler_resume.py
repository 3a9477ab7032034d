"""Resuming a `SelectionSampler` mid-epoch (against the FakeBackend served over HTTP).

A run checkpointed after k batches and rebuilt from the checkpoint in fresh objects (a new client,
sampler and loader, as a restarted trainer would) yields exactly the batches that the
uninterrupted run yields after its first k.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from saelect.client import SelectionClient, SelectionSampler
from torch.utils.data import DataLoader, TensorDataset

from tests.unit.fakes import FakeBackend
from tests.unit.test_client import SPEC, TOKEN, ServerThread, free_socket, make_app

N = 500
BATCH = 8
WORLD = 2
DATASET = TensorDataset(torch.arange(N))

try:
    from torchdata.stateful_dataloader import StatefulDataLoader
except ImportError:  # pragma: no cover - depends on the environment
    StatefulDataLoader = None

# torchdata 0.11 calls torch.set_vital, which torch 2.13 marks deprecated
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")

requires_torchdata = pytest.mark.skipif(
    StatefulDataLoader is None,
    reason="torchdata is not installed: pip install -e '.[dev]' (it brings torchdata)",
)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server = ServerThread(make_app(FakeBackend(N), TOKEN), free_socket()).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def job(url: str) -> str:
    with SelectionClient(url, token=TOKEN) as c:
        return str(c.create_job(SPEC)["id"])


def new_sampler(url: str, job: str, rank: int) -> SelectionSampler:
    return SelectionSampler(SelectionClient(url, token=TOKEN), job, rank=rank, world_size=WORLD)


def batches(loader: Any, sampler: SelectionSampler, epochs: range) -> list[list[int]]:
    """Every batch of ``epochs`` as lists of dataset rows."""
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out.extend(b[0].tolist() for b in loader)
    return out


@requires_torchdata
@pytest.mark.parametrize(("k", "workers"), [(0, 0), (5, 0), (8, 0), (3, 2)])
def test_stateful_dataloader_resumes_where_it_stopped(
    url: str, job: str, k: int, workers: int
) -> None:
    """k = 8 is the epoch's last batch (63 indices a rank / 8): the resume starts a new epoch."""
    rank = 1
    sampler = new_sampler(url, job, rank)
    loader = StatefulDataLoader(DATASET, batch_size=BATCH, sampler=sampler, num_workers=workers)
    full = batches(loader, sampler, range(3))
    per_epoch = -(-sampler.plan["epochs"][0]["per_rank"] // BATCH)
    assert per_epoch == 8 and len(full) == 3 * per_epoch

    # interrupted run: epoch 0, then k batches of epoch 1, then a checkpoint
    sampler = new_sampler(url, job, rank)
    loader = StatefulDataLoader(DATASET, batch_size=BATCH, sampler=sampler, num_workers=workers)
    head = batches(loader, sampler, range(1))
    sampler.set_epoch(1)
    it = iter(loader)
    head += [next(it)[0].tolist() for _ in range(k)]
    ckpt = pickle.loads(pickle.dumps({"loader": loader.state_dict(), "epoch": 1}))
    del it, loader

    sampler = new_sampler(url, job, rank)  # a restarted trainer
    loader = StatefulDataLoader(DATASET, batch_size=BATCH, sampler=sampler, num_workers=workers)
    loader.load_state_dict(ckpt["loader"])
    tail = batches(loader, sampler, range(ckpt["epoch"], 3))
    assert head == full[: per_epoch + k]
    assert tail == full[per_epoch + k :]


def test_plain_protocol_resumes_a_plain_dataloader(url: str, job: str) -> None:
    sampler = new_sampler(url, job, 0)
    full = batches(DataLoader(DATASET, batch_size=BATCH, sampler=sampler), sampler, range(3))

    sampler = new_sampler(url, job, 0)
    sampler.set_epoch(2)
    it = iter(DataLoader(DATASET, batch_size=BATCH, sampler=sampler))
    head = [next(it)[0].tolist() for _ in range(3)]
    state = copy.deepcopy(sampler.state_dict())
    assert state == {"job_id": job, "world_size": WORLD, "rank": 0, "epoch": 2, "position": 24}

    sampler = new_sampler(url, job, 0)
    sampler.load_state_dict(state)
    assert sampler.state_dict() == state
    tail = batches(DataLoader(DATASET, batch_size=BATCH, sampler=sampler), sampler, range(2, 3))
    assert head + tail == full[16:]


def test_a_resumed_position_is_dropped_for_another_epoch(url: str, job: str) -> None:
    sampler = new_sampler(url, job, 0)
    sampler.load_state_dict({**sampler.state_dict(), "epoch": 1, "position": 60})
    sampler.set_epoch(1)  # the loop's usual call for the resumed epoch keeps the position
    assert len(list(sampler)) == 63 - 60
    sampler.load_state_dict({**sampler.state_dict(), "epoch": 1, "position": 60})
    sampler.set_epoch(2)
    assert np.array_equal(list(sampler), sampler.indices())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"job_id": "other"}, "job_id='other'"),
        ({"world_size": 3}, "world_size=3"),
        ({"rank": 1}, "rank=1"),
        ({"epoch": 3}, "epoch 3 outside"),
        ({"position": 64}, "position 64 outside"),
        ({"position": None}, "int"),
    ],
)
def test_load_state_dict_refuses_a_foreign_state(
    url: str, job: str, change: dict[str, Any], match: str
) -> None:
    sampler = new_sampler(url, job, 0)
    state = {**sampler.state_dict(), **change}
    with pytest.raises((ValueError, TypeError), match=match):
        sampler.load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        sampler.load_state_dict({"epoch": 0})
