"""The e2e tests share the integration tests' local Ray fixture (and its environment)."""

from tests.integration.conftest import ray_local

__all__ = ["ray_local"]
