"""Pydantic request and response models of the HTTP API (docs/api.md). Pydantic lives only here
and in settings; the core works on the frozen dataclasses of ``service.specs``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from saelect.service.backend import Phase

# --- requests -----------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureModel(_Strict):
    """How to turn a row into a feature vector (``workers.features.FeatureSpec``)."""

    kind: Literal["column", "pixels", "selfsup", "text", "module", "image_model"]
    column: str = Field(min_length=1, description="source column in the Parquet data")
    dim: int | None = Field(
        default=None, ge=1, description="pixels: PCA output dim; selfsup: encoder output dim"
    )
    module: str | None = Field(
        None, description="module kind: 'pkg.mod:factory' returning an nn.Module (allow-listed)"
    )
    batch_size: int = Field(default=1024, ge=1)
    image_shape: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None,
        min_length=3,
        max_length=3,
        description="selfsup kind: (C, H, W) of the flattened channel-first images; "
        "default (1, s, s) or (3, s, s) from the row length",
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="image_model: backbone name, or a local transformers model directory; "
        "text: sentence-transformers model name or local directory (default: packaged MiniLM)",
    )
    weights: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="image_model (timm, torchvision): local weights file under an allowed root",
    )
    library: Literal["timm", "torchvision", "transformers"] | None = Field(
        default=None, description="image_model: where the backbone comes from (default timm)"
    )
    image_size: int | None = Field(
        default=None, ge=8, le=4096, description="image_model: resize side (default 224)"
    )


class DatasetModel(_Strict):
    """Where the data is: a Parquet file or directory, local path or pyarrow URI."""

    uri: str = Field(min_length=1, max_length=4096)
    label_column: str | None = None
    feature: FeatureModel


class PolicyModel(_Strict):
    """Selection policy (``service.policies.PolicyConfig``)."""

    name: str = Field(min_length=1, description="factor, full, static_random, rs2, infobatch...")
    ratio: float = Field(gt=0.0, le=1.0, description="keep ratio r per epoch")
    epochs: int = Field(ge=1, le=1_000_000)
    seed: int = Field(default=0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)


class SAEModel(_Strict):
    """Sparse autoencoder config (``workers.sae.SAEConfig``); unset fields keep its defaults."""

    units: int | None = Field(default=None, ge=1)
    k: int | None = Field(default=None, ge=1)
    activation: Literal["topk", "relu_l1"] | None = None
    l1_coef: float | None = Field(default=None, ge=0.0)
    aux_k: int | None = Field(default=None, ge=1)
    aux_coef: float | None = Field(default=None, ge=0.0)
    lr: float | None = Field(default=None, gt=0.0)
    batch_size: int | None = Field(default=None, ge=1)
    epochs: int | None = Field(default=None, ge=1)
    max_train_samples: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0)
    device: str | None = None
    dead_steps: int | None = Field(default=None, ge=1)
    encode_dtype: Literal["float32", "bfloat16"] | None = None
    normalize_decoder: bool | None = None
    remove_parallel_grad: bool | None = None


class ScoresModel(_Strict):
    """How R and D are computed (``workers.scores.ScoreConfig``); unset fields keep defaults."""

    representativeness: Literal["weighted", "frequent_set"] | None = None
    diversity: Literal["weighted", "max"] | None = None
    quantile: float | None = Field(default=None, gt=0.0, lt=1.0)


class ScoringModel(_Strict):
    """What the scoring may reserve on the cluster; every field optional."""

    gpus: int | None = Field(
        default=None, ge=0, description="GPUs to score on (a worker each); null: the cluster's"
    )
    cpu_workers: int | None = Field(
        default=None, ge=1, description="CPU workers when scoring without GPUs; null: one per CPU"
    )
    cpus_per_worker: float | None = Field(default=None, gt=0.0)
    placement_timeout_s: float | None = Field(
        default=None, gt=0.0, description="seconds to wait for the resources before failing"
    )


class JobSpecModel(_Strict):
    """Body of ``POST /v1/jobs``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "name": "fmnist-factor",
                "dataset": {
                    "uri": "/data/fmnist/train.parquet",
                    "label_column": "label",
                    "feature": {"kind": "pixels", "column": "image", "dim": 256},
                },
                "policy": {
                    "name": "factor",
                    "ratio": 0.5,
                    "epochs": 10,
                    "seed": 0,
                    "params": {"gamma": 2.0, "schedule": "cosine"},
                },
                "sae": {"units": 2048, "k": 32},
            }
        },
    )

    name: str = Field(min_length=1, max_length=200)
    dataset: DatasetModel
    policy: PolicyModel
    sae: SAEModel = Field(default_factory=lambda: SAEModel())
    scores: ScoresModel = Field(default_factory=lambda: ScoresModel())
    scoring: ScoringModel = Field(default_factory=lambda: ScoringModel())


class FeedbackModel(_Strict):
    """JSON body of ``POST .../feedback``: per-sample losses, ``indices[i]`` has ``losses[i]``."""

    indices: list[int]
    losses: list[float]


# --- responses ----------------------------------------------------------------------------


class ProgressModel(BaseModel):
    done: int
    total: int


class JobStatusModel(BaseModel):
    """A job's status."""

    id: str
    name: str
    phase: Phase
    progress: ProgressModel
    reason: str | None = Field(
        default=None, description="why the job waits (queued): the resources it needs, what is free"
    )
    num_samples: int | None
    epochs_committed: int
    error: str | None


class JobListModel(BaseModel):
    jobs: list[JobStatusModel]


class EpochPlanModel(BaseModel):
    epoch: int
    size: int
    per_rank: int


class PlanModel(BaseModel):
    """Every epoch's subset size and each rank's length for ``world_size`` ranks."""

    world_size: int
    epochs: list[EpochPlanModel]
    sample_fraction: float


class IndicesModel(BaseModel):
    """JSON form of one rank's indices (``Accept: application/json``)."""

    epoch: int
    rank: int
    world_size: int
    indices: list[int]


class FeedbackAckModel(BaseModel):
    epoch: int
    count: int
    duplicate: bool | None = None
    """Keyed posts only (absent otherwise): True when the post's (rank, seq) key was already
    applied, so it was acknowledged without applying its losses again."""


class UsageModel(BaseModel):
    min: float
    max: float
    mean: float


class StatsModel(BaseModel):
    """Per-epoch statistics; a backend may add keys."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    epoch: int
    lambda_: float | None = Field(default=None, alias="lambda")
    size: int
    coverage: float | None = None
    usage: UsageModel | None = None
    factor_coverage: float | None = None


class HealthModel(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


class ErrorBodyModel(BaseModel):
    code: str
    message: str


class ErrorModel(BaseModel):
    """Every error answer: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorBodyModel
