"""A simulated two-node cluster (ray.cluster_utils.Cluster): shards spread, same result.

This module needs its own Ray instance, so it does not use `ray_local`: its fixture shuts down
any Ray this process still has, starts the two-node cluster, and shuts both down afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster
from saelect.workers.features import FeatureSpec
from saelect.workers.pipeline import run_scoring
from saelect.workers.sae import SAEConfig
from saelect.workers.scores import ScoreConfig
from saelect.workers.scoring_local import score_single_process
from saelect.workers.selection_state import SelectionShards
from saelect.workers.storage import Storage

pytestmark = pytest.mark.ray

FEATURE = FeatureSpec("pixels", "image", dim=16)
SAE = SAEConfig(units=64, k=8, epochs=2, batch_size=256, max_train_samples=1000)
SCORE = ScoreConfig(representativeness="frequent_set", diversity="max")


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    """A head node and a worker node with one CPU each, connected as this process's Ray."""
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 256 * 1024**2},
    )
    cluster.add_node(num_cpus=1, object_store_memory=256 * 1024**2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_scoring_and_state_spread_over_both_nodes_and_match_single_process(
    two_nodes: Cluster, digits_uri: str, tmp_path: Path
) -> None:
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    ref = score_single_process(digits_uri, FEATURE, "label", SAE, SCORE)
    result = run_scoring(
        Storage(str(tmp_path / "job")),
        digits_uri,
        FEATURE,
        "label",
        SAE,
        SCORE,
        num_shards=4,
        progress_bar=False,
    )
    # the scoring's encode tasks ran on both raylets, and nothing stays reserved
    state = result.storage.read_json("pipeline.json")
    assert len(state["encoding"]["nodes"]) == 2
    deadline = time.monotonic() + 10  # the placement group's removal is asynchronous
    while ray.available_resources().get("CPU", 0.0) < 2.0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]
    r, d = result.scores()
    np.testing.assert_allclose(r, ref.R, rtol=0, atol=1e-12)
    np.testing.assert_allclose(d, ref.D, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(result.counts, ref.counts)
    shards = SelectionShards.start(result.plan, result.storage, "label", k=SAE.k)
    try:
        assert len({info["node_id"] for info in shards.info()}) == 2
    finally:
        shards.shutdown()
