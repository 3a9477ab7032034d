"""Feature extractors (docs/architecture.md, The method 1): spec, registry, factory, Arrow column
conversion.

Example:
    >>> import numpy as np
    >>> ex = make_extractor(FeatureSpec("pixels", "image", dim=2))
    >>> ex.fit(np.random.default_rng(0).random((10, 4)))
    >>> ex.transform(np.zeros((3, 4)), progress=False).shape
    (3, 2)
"""

from __future__ import annotations

from saelect.workers.features.base import (
    DEFAULT_PIXELS_DIM,
    KINDS,
    Extractor,
    FeatureSpec,
    as_float_matrix,
    column_to_numpy,
)
from saelect.workers.features.column import ColumnExtractor
from saelect.workers.features.image_model import ImageModelExtractor
from saelect.workers.features.module import ModuleExtractor
from saelect.workers.features.pixels import PixelsExtractor
from saelect.workers.features.selfsup import SELFSUP_DIM, SelfSupExtractor
from saelect.workers.features.text import TEXT_DIM, TextExtractor

__all__ = [
    "DEFAULT_PIXELS_DIM",
    "EXTRACTORS",
    "KINDS",
    "SELFSUP_DIM",
    "TEXT_DIM",
    "ColumnExtractor",
    "Extractor",
    "FeatureSpec",
    "ImageModelExtractor",
    "ModuleExtractor",
    "PixelsExtractor",
    "SelfSupExtractor",
    "TextExtractor",
    "as_float_matrix",
    "column_to_numpy",
    "make_extractor",
]

EXTRACTORS: dict[str, type] = {
    "column": ColumnExtractor,
    "pixels": PixelsExtractor,
    "selfsup": SelfSupExtractor,
    "text": TextExtractor,
    "module": ModuleExtractor,
    "image_model": ImageModelExtractor,
}
"""Extractor class by `FeatureSpec.kind`."""

if set(EXTRACTORS) != set(KINDS):  # pragma: no cover - a coding error, caught on import
    raise RuntimeError(f"EXTRACTORS {sorted(EXTRACTORS)} != KINDS {sorted(KINDS)}")


def make_extractor(spec: FeatureSpec) -> Extractor:
    """A new, unfitted extractor for ``spec`` (call ``fit`` or ``load_state_dict`` next)."""
    return EXTRACTORS[spec.kind](spec)
