"""saelect: distributed dynamic data selection on Ray.

One import name for the three parts, kept as folders at the repository root and installed
below it (pyproject.toml, ``[tool.setuptools.package-dir]``):

- ``saelect.client``: what a trainer needs (`SelectionClient`, `SelectionSampler`, the feedback
  reporter); numpy and httpx only;
- ``saelect.service``: the HTTP service, the job manager, the selection math and policies;
- ``saelect.workers``: scoring (features, SAE, codes, R and D) and the Ray pieces.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("saelect")
except PackageNotFoundError:  # pragma: no cover - running from a tree that is not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
