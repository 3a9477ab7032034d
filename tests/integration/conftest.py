"""Local Ray for the integration tests: one instance per test module, started on first use.

The environment variables must be set before ``ray`` is imported anywhere in the process, so they
are set here, at collection time. A module that needs a different cluster (the simulated two-node
cluster) uses its own fixture; `ray_local` shuts Ray down at the end of each module so the next
module starts from a clean process state.

``RAY_AUTH_MODE=disabled`` applies to the Rays these tests start themselves (in this process, or
with ``ray start``). The embedded Ray of a `saelect serve` the tests start ignores it and runs
with token authentication on loopback (`service/ray_local.py`,
`tests/integration/test_serve_process.py`).
"""

from __future__ import annotations

import os

for _key, _value in {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import ray  # noqa: E402


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A private local Ray with 2 CPUs for the whole test module; shut down afterwards."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=512 * 1024**2,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """scikit-learn digits (all 1797 rows, 8x8) as Parquet, written by `workers.datasets`."""
    from saelect.workers.datasets import load_digits, write_image_parquet

    data = load_digits()
    path = tmp_path_factory.mktemp("digits") / "digits.parquet"
    return str(write_image_parquet(path, data.images, data.labels))


@pytest.fixture(scope="session")
def fmnist_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The first 4000 Fashion-MNIST training rows as Parquet (skips when not installed)."""
    from saelect.workers.datasets import FMNIST_DIR, load_fashion_mnist, write_image_parquet

    from tests.optional import skip_without_fashion_mnist

    skip_without_fashion_mnist()
    data = load_fashion_mnist(FMNIST_DIR, "train")
    path = tmp_path_factory.mktemp("fmnist") / "fmnist-4000.parquet"
    return str(write_image_parquet(path, data.images[:4000], data.labels[:4000]))
