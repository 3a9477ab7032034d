"""Encoded images (PNG, JPEG, ... as Parquet stores them) to float arrays, with Pillow.

A row is a Hugging Face ``Image`` struct ``{"bytes": b"...", "path": "..."}`` (how ``datasets``
exports images to Parquet) or the raw encoded bytes. Rows that hold only a ``path`` are refused:
a service does not open files that a job spec names inside its data; export the dataset with its
bytes embedded (``datasets``' ``to_parquet`` does).

Example:
    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.new("RGB", (5, 4)).save(buf, format="PNG")
    >>> decode_images([{"bytes": buf.getvalue(), "path": "a.png"}], size=8).shape
    (1, 3, 8, 8)
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["decode_images", "image_bytes"]


def image_bytes(row: Any, i: int = 0) -> bytes:
    """The encoded bytes of one row (a ``{"bytes", "path"}`` struct or bytes).

    Raises
    ------
    ValueError
        For a null row, a struct without bytes, or another type.
    """
    if isinstance(row, bytes | bytearray | memoryview):
        return bytes(row)
    if isinstance(row, dict):
        data = row.get("bytes")
        if isinstance(data, bytes | bytearray | memoryview) and len(data):
            return bytes(data)
        raise ValueError(
            f"image row {i} has no bytes (path {row.get('path')!r}): rows must embed the "
            "encoded image; path-only rows are not read"
        )
    raise ValueError(
        f"image row {i} is {type(row).__name__}; expected encoded bytes or a "
        '{"bytes", "path"} struct'
    )


def decode_images(rows: Sequence[Any], size: int) -> np.ndarray:
    """float32 (n, 3, size, size) RGB in [0, 1] of encoded images, each resized (bilinear) to
    size x size; grey, palette and alpha images are converted to RGB.

    Raises
    ------
    ValueError
        Naming the row, when a row is not an image Pillow can decode.
    """
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(rows), 3, size, size), dtype=np.float32)
    for i, row in enumerate(rows):
        data = image_bytes(row, i)
        try:
            with Image.open(io.BytesIO(data)) as img:
                rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"image row {i} cannot be decoded: {exc}") from exc
        out[i] = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return out
