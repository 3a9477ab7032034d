"""Tasks of the training benchmark: data, model, training regime and scoring config per task.

``TASKS`` maps a ``--task`` name of ``benchmarks/train_bench.py`` to its ``TaskSpec``: the clean
tasks (``fmnist``, ``fmnist-short``, ``digits``, ``text``) and the data regimes of issue 15
(``fmnist-ref``, ``fmnist-dup``, ``fmnist-lt``, ``fmnist-noisy``; built by
``benchmarks/train_regimes.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from benchmarks.train_data import DATA_NAMES
from benchmarks.train_loop import OptimConfig
from benchmarks.train_models import AugmentConfig, ModelConfig


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task: data, model, training regime and the service's scoring config."""

    name: str
    """Task name (``--task``)."""
    data: str
    """``fmnist``, ``digits`` or ``text`` (benchmarks.train_data.load_task)."""
    model: ModelConfig
    """Model kind and size."""
    augment: AugmentConfig | None
    """Batch augmentation (images), or None."""
    epochs: int
    """E: epochs of every full-length run."""
    optim: OptimConfig
    """Optimizer and LR schedule (shape shared by every run of the task)."""
    sae: dict[str, Any]
    """The job spec's ``sae`` section."""
    feature_overrides: dict[str, Any] = field(default_factory=dict)
    """Changes to the data's default feature spec."""
    data_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the data's loader (regimes: ``base_size`` and the builder's)."""
    eval_every: int = 1
    """Evaluate on the test set every this many epochs (and after the last)."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.data not in DATA_NAMES:
            raise ValueError(f"data must be one of {', '.join(DATA_NAMES)}, got {self.data!r}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")


_FMNIST_SAE = {"units": 2048, "k": 32}
TASKS: dict[str, TaskSpec] = {
    # Main regime: augmentation (random crop, pad 2, and flip) keeps the small CNN data-hungry.
    "fmnist": TaskSpec(
        name="fmnist",
        data="fmnist",
        model=ModelConfig("cnn", width=16, hidden=128, dropout=0.1),
        augment=AugmentConfig(pad=2, flip=True),
        epochs=20,
        optim=OptimConfig(lr=0.1, batch_size=256, weight_decay=5e-4),
        sae=_FMNIST_SAE,
    ),
    # Short regime (E = 12), same model and augmentation.
    "fmnist-short": TaskSpec(
        name="fmnist-short",
        data="fmnist",
        model=ModelConfig("cnn", width=16, hidden=128, dropout=0.1),
        augment=AugmentConfig(pad=2, flip=True),
        epochs=12,
        optim=OptimConfig(lr=0.1, batch_size=256, weight_decay=5e-4),
        sae=_FMNIST_SAE,
    ),
    "digits": TaskSpec(
        name="digits",
        data="digits",
        model=ModelConfig("mlp", hidden=128, dropout=0.1),
        augment=None,
        epochs=30,
        optim=OptimConfig(lr=0.05, batch_size=32, weight_decay=5e-4),
        sae={"units": 256, "k": 8, "epochs": 40, "batch_size": 256},
    ),
    "text": TaskSpec(
        name="text",
        data="text",
        model=ModelConfig("mlp", hidden=256, dropout=0.3),
        augment=None,
        epochs=20,
        optim=OptimConfig(lr=0.05, batch_size=64, weight_decay=5e-4),
        sae={"units": 1536, "k": 16},
    ),
}
REGIME_EPOCHS = 10
"""E of the data-regime tasks (issue 15): half the clean task's, to fit a CPU sweep."""
REGIME_BASE_SIZE = 10000
"""Rows of the class-stratified Fashion-MNIST subset the ref, dup and noisy regimes start from."""
REGIME_ARGS: dict[str, dict[str, Any]] = {"fmnist-lt": {"head_size": 3000}}
"""Loader arguments of regimes that do not start from the base subset."""
TASKS.update(
    {
        # Data regimes (benchmarks/train_regimes.py): the clean task's model, augmentation and
        # optimizer at a reduced scale to fit a CPU sweep (10k-row base subset; the long tail
        # has 3000 head images, 7.4k rows), E = 10, evaluated after epochs 5 and 10.
        name: TaskSpec(
            name=name,
            data=name,
            model=ModelConfig("cnn", width=16, hidden=128, dropout=0.1),
            augment=AugmentConfig(pad=2, flip=True),
            epochs=REGIME_EPOCHS,
            optim=OptimConfig(lr=0.1, batch_size=256, weight_decay=5e-4),
            sae=_FMNIST_SAE,
            data_args=REGIME_ARGS.get(name, {"base_size": REGIME_BASE_SIZE}),
            eval_every=5,
        )
        for name in ("fmnist-ref", "fmnist-dup", "fmnist-lt", "fmnist-noisy")
    }
)
