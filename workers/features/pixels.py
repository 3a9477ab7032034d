"""The ``pixels`` extractor: per-pixel standardization, then PCA to ``dim`` (docs/architecture.md,
The method 1).

For images with no pretrained encoder at hand. Fitted once on a sample: per-pixel mean and std
(constant pixels get std 1), then the top principal axes of the standardized sample
(eigenvectors of its scatter matrix, in float64; each axis' sign is fixed so that its
largest-magnitude entry is positive, so the fit is reproducible). ``transform`` projects
(x - mean) / std on the axes, computed in float64 and rounded to float32, batch by batch; a
row's features do not depend on its batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from saelect.workers.features.base import (
    DEFAULT_PIXELS_DIM,
    FeatureSpec,
    as_float_matrix,
    map_batches,
)

__all__ = ["PixelsExtractor"]


class PixelsExtractor:
    """Standardize per pixel, then PCA to ``spec.dim`` (default 256).

    The output dim is ``min(spec.dim, D, n_fit)`` for D pixels and n_fit fit rows.
    """

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.out_dim: int | None = None
        self.mean_D: np.ndarray | None = None  # float64 (D,)
        self.std_D: np.ndarray | None = None  # float64 (D,)
        self.components_KD: np.ndarray | None = None  # float64 (out_dim, D), orthonormal rows

    def fit(self, sample: Any) -> None:
        """Standardization and principal axes from ``sample`` (n, ...) numeric."""
        x_ND = as_float_matrix(sample, f"column {self.spec.column!r}").astype(np.float64)
        n, d = x_ND.shape
        if n < 1:
            raise ValueError("pixels extractor needs at least 1 row to fit")
        mean_D = x_ND.mean(axis=0)
        std_D = x_ND.std(axis=0)
        std_D = np.where(std_D > 1e-8, std_D, 1.0)
        z_ND = (x_ND - mean_D) / std_D
        want = self.spec.dim if self.spec.dim is not None else DEFAULT_PIXELS_DIM
        out_dim = int(min(want, d, n))
        # principal axes = top eigenvectors of the scatter matrix (d x d): one BLAS-3 product
        # and a small symmetric eigensolver, ~8x faster than an SVD of the (n, d) sample
        evals_D, evecs_DD = np.linalg.eigh(z_ND.T @ z_ND)  # ascending eigenvalues
        order = np.argsort(-evals_D, kind="stable")[:out_dim]
        comps_KD = evecs_DD[:, order].T
        # deterministic signs: the largest-magnitude entry of each axis is positive
        pivot = comps_KD[np.arange(out_dim), np.abs(comps_KD).argmax(axis=1)]
        comps_KD = comps_KD * np.where(pivot < 0, -1.0, 1.0)[:, None]
        self.mean_D, self.std_D = mean_D, std_D
        self.components_KD = np.ascontiguousarray(comps_KD)
        self.out_dim = out_dim

    def _fitted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean (D,), std (D,), components (out_dim, D)); ValueError when not fitted."""
        if self.mean_D is None or self.std_D is None or self.components_KD is None:
            raise ValueError("pixels extractor is not fitted: call fit() or load_state_dict()")
        return self.mean_D, self.std_D, self.components_KD

    def _project(self, batch: np.ndarray) -> np.ndarray:
        mean_D, std_D, comps_KD = self._fitted()
        x_BD = as_float_matrix(batch, f"column {self.spec.column!r}").astype(np.float64)
        if x_BD.shape[1] != mean_D.shape[0]:
            raise ValueError(
                f"column {self.spec.column!r} has {x_BD.shape[1]} values per row, "
                f"the extractor was fitted on {mean_D.shape[0]}"
            )
        return (((x_BD - mean_D) / std_D) @ comps_KD.T).astype(np.float32)

    def transform(self, values: Any, *, progress: bool = True) -> np.ndarray:
        """float32 (n, out_dim) PCA features of ``values`` (n, ...)."""
        out_dim = self._fitted()[2].shape[0]  # components (out_dim, D)
        arr = np.asarray(values)
        return map_batches(
            self._project,
            arr,
            out_dim,
            self.spec.batch_size,
            progress=progress,
            desc="pixels",
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        """``mean`` (D,), ``std`` (D,), ``components`` (out_dim, D), all float64."""
        mean_D, std_D, comps_KD = self._fitted()
        return {"mean": mean_D, "std": std_D, "components": comps_KD}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore from `state_dict`."""
        comps = np.asarray(state["components"], dtype=np.float64)
        mean = np.asarray(state["mean"], dtype=np.float64)
        std = np.asarray(state["std"], dtype=np.float64)
        if comps.ndim != 2 or comps.shape[1] != mean.shape[0] or std.shape != mean.shape:
            raise ValueError(
                f"inconsistent pixels state: components {comps.shape}, mean {mean.shape}, "
                f"std {std.shape}"
            )
        self.mean_D, self.std_D, self.components_KD = mean, std, comps
        self.out_dim = int(comps.shape[0])
