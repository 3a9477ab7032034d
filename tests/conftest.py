"""Shared Ray-free fixtures: scikit-learn digits as features, and an SAE fitted on them once.

Fixtures here are session-scoped and built on first use only, so tests that do not ask for them
pay nothing.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DIGITS_SAE_CONFIG: dict[str, Any] = {
    "units": 256,
    "k": 8,
    "epochs": 8,
    "batch_size": 256,
    "lr": 3e-3,
    "seed": 0,
}
"""The SAE the digits tests share (SAEConfig kwargs): small enough to fit in a few seconds."""


@pytest.fixture(scope="session")
def digits_features() -> np.ndarray:
    """float32 (1797, 64): scikit-learn digits pixels (0..16) as features."""
    from sklearn.datasets import load_digits

    return np.asarray(load_digits().data, dtype=np.float32)


@pytest.fixture(scope="session")
def digits_labels() -> np.ndarray:
    """int64 (1797,) digit classes."""
    from sklearn.datasets import load_digits

    return np.asarray(load_digits().target, dtype=np.int64)


@pytest.fixture(scope="session")
def digits_sae(digits_features: np.ndarray) -> Any:
    """`SAEFit` of a TopK SAE (M=256, k=8) trained on the digits features."""
    from saelect.workers.sae import SAEConfig
    from saelect.workers.sae_fit import fit_sae

    return fit_sae(digits_features, SAEConfig(**DIGITS_SAE_CONFIG), progress=False)
