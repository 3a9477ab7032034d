"""Every policy that reads scores is scored by the service; the others run on bare shards."""

from __future__ import annotations

import numpy as np
import pytest
from saelect.service.job_scoring import SCORED_POLICIES
from saelect.service.policies import POLICIES, PolicyConfig, make_policy
from saelect.service.selection.engine import SingleProcessSelector
from saelect.workers.shard_data import ShardData


@pytest.mark.parametrize("name", sorted(set(POLICIES) - SCORED_POLICIES))
def test_score_free_policies_select_without_scores(name: str) -> None:
    """A job the service does not score gets a shard with labels only: it must still select."""
    engine = SingleProcessSelector(
        make_policy(PolicyConfig(name, 0.3, 3, seed=1)),
        ShardData(0, 200, labels=np.arange(200) % 4),
    )
    for _ in range(3):  # infobatch keeps more than its plan without loss feedback: no size check
        idx = engine.step().indices
        assert idx.shape[0] > 0 and np.unique(idx).shape[0] == idx.shape[0]
        assert idx.min() >= 0 and idx.max() < 200
