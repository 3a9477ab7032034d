"""The ``column`` extractor: the dataset already holds the feature vectors (production path)."""

from __future__ import annotations

from typing import Any

import numpy as np
from saelect.workers.features.base import (
    FeatureSpec,
    as_float_matrix,
    dim_from_state,
    dim_state,
    require_fitted,
)

__all__ = ["ColumnExtractor"]


class ColumnExtractor:
    """Identity on a numeric vector column: float32 (n, d) as stored.

    ``fit`` records d (and checks it against ``spec.dim`` when given); ``transform`` checks
    every batch has that d and finite values.
    """

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.out_dim: int | None = None

    def fit(self, sample: Any) -> None:
        """Record the vector dim of ``sample`` (n, d)."""
        x_ND = as_float_matrix(sample, f"column {self.spec.column!r}")
        d = int(x_ND.shape[1])
        if self.spec.dim is not None and d != self.spec.dim:
            raise ValueError(
                f"column {self.spec.column!r} has dim {d}, the feature spec says {self.spec.dim}"
            )
        self.out_dim = d

    def transform(self, values: Any, *, progress: bool = True) -> np.ndarray:
        """float32 (n, d) copy of ``values``."""
        out_dim = require_fitted(self.out_dim, "column")
        x_ND = as_float_matrix(values, f"column {self.spec.column!r}")
        if x_ND.shape[1] != out_dim:
            raise ValueError(
                f"column {self.spec.column!r} has dim {x_ND.shape[1]}, fitted dim {out_dim}"
            )
        return np.array(x_ND, dtype=np.float32, copy=True)

    def state_dict(self) -> dict[str, np.ndarray]:
        """``{"out_dim": int64 scalar}``."""
        return dim_state(self.out_dim, "column")

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore the dim from `state_dict`."""
        self.out_dim = dim_from_state(state)
