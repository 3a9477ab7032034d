"""The job spec as frozen dataclasses, its JSON round trip, and its validation at the edge.

A job spec arrives as the pydantic ``service.models.JobSpecModel`` (``POST /v1/jobs``) or as a
plain dict (``saelect jobs create SPEC.json``, the store's ``spec.json``) and becomes a
``JobSpec`` of core configs: ``workers.features.FeatureSpec``, ``workers.sae.SAEConfig`` and
``service.policies.PolicyConfig``. Validation at creation refuses dataset URIs with ``..``
segments or outside the allowed roots, and ``module`` extractors that are not allow-listed.

Example:
    >>> spec = job_spec_from_dict(
    ...     {"name": "a", "dataset": {"uri": "/usr/share/datasets/x.parquet",
    ...      "feature": {"kind": "pixels", "column": "image"}},
    ...      "policy": {"name": "factor", "ratio": 0.5, "epochs": 3}},
    ...     allowed_roots=["/usr/share/datasets"])
    >>> JobSpec.from_dict(spec.to_dict()) == spec
    True
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from saelect.service.errors import InvalidRequest
from saelect.service.policies import PolicyConfig, make_policy
from saelect.workers.admission import ScoringResources
from saelect.workers.features import FeatureSpec
from saelect.workers.sae import SAEConfig
from saelect.workers.scores import ScoreConfig

if TYPE_CHECKING:
    from saelect.service.models import JobSpecModel
    from saelect.service.settings import Settings


@dataclass(frozen=True)
class DatasetSpec:
    """Where a job's data is and how rows become features."""

    uri: str
    """Parquet file or directory: an absolute local path or a pyarrow filesystem URI."""
    feature: FeatureSpec
    """Feature extractor spec."""
    label_column: str | None = None
    """Column with integer class labels (class quotas, stats); None when there is none."""

    def __post_init__(self) -> None:
        if not self.uri:
            raise ValueError(f"dataset uri must be non-empty, got {self.uri!r}")
        if self.label_column is not None and not self.label_column:
            raise ValueError(f"label_column must be None or non-empty, got {self.label_column!r}")


@dataclass(frozen=True)
class JobSpec:
    """Everything that defines a job; stored as ``spec.json`` and never changed afterwards."""

    name: str
    """User-given name (not unique; the job id is)."""
    dataset: DatasetSpec
    """The data and its features."""
    policy: PolicyConfig
    """Selection policy: name, ratio, epochs, seed, params."""
    sae: SAEConfig = field(default_factory=SAEConfig)
    """Sparse autoencoder config (used by the ``factor`` policy's scoring)."""
    scores: ScoreConfig = field(default_factory=ScoreConfig)
    """How representativeness R and diversity D are computed from the codes."""
    scoring: ScoringResources = field(default_factory=ScoringResources)
    """What the scoring may reserve on the cluster (GPUs, CPU workers) and how long it waits."""

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 200:
            raise ValueError(f"name must have 1 to 200 characters, got {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that ``from_dict`` turns back into an equal spec."""
        return {
            "name": self.name,
            "dataset": {
                "uri": self.dataset.uri,
                "label_column": self.dataset.label_column,
                "feature": dataclasses.asdict(self.dataset.feature),
            },
            "policy": dataclasses.asdict(self.policy),
            "sae": dataclasses.asdict(self.sae),
            "scores": dataclasses.asdict(self.scores),
            "scoring": dataclasses.asdict(self.scoring),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobSpec:
        """Rebuild a spec from ``to_dict`` output, without the URI/module policy checks.

        Raises
        ------
        InvalidRequest
            When a section is missing or a config rejects its values.
        """
        return _build(d)


def _section(d: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = d.get(key, {})
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"{key} must be an object, got {type(value).__name__}")
    return dict(value)


def _construct(where: str, cls: type, kwargs: dict[str, Any]) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise InvalidRequest(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"{where}: {exc}") from exc


def _build(d: Mapping[str, Any]) -> JobSpec:
    if not isinstance(d, Mapping):
        raise InvalidRequest(f"job spec must be an object, got {type(d).__name__}")
    ds = _section(d, "dataset")
    if "uri" not in ds:
        raise InvalidRequest("dataset.uri is required")
    feature = _construct("dataset.feature", FeatureSpec, _section(ds, "feature"))
    try:
        dataset = DatasetSpec(
            uri=str(ds["uri"]), feature=feature, label_column=ds.get("label_column")
        )
    except ValueError as exc:
        raise InvalidRequest(f"dataset: {exc}") from exc
    policy = _construct("policy", PolicyConfig, _section(d, "policy"))
    try:
        make_policy(policy)  # validates the policy's params
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"policy.params: {exc}") from exc
    sae = _construct("sae", SAEConfig, _section(d, "sae"))
    scores = _construct("scores", ScoreConfig, _section(d, "scores"))
    scoring = _construct("scoring", ScoringResources, _section(d, "scoring"))
    try:
        return JobSpec(
            name=str(d.get("name", "")),
            dataset=dataset,
            policy=policy,
            sae=sae,
            scores=scores,
            scoring=scoring,
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc


# --- validation at the edge ---------------------------------------------------------------


def _is_uri(s: str) -> bool:
    return "://" in s


def _canonical(location: str) -> str:
    """Canonical form for prefix checks: realpath for local paths, ``scheme://path`` for URIs."""
    if location.lower().startswith("file://"):
        location = location[len("file://") :] or "/"
    if not _is_uri(location):
        return os.path.realpath(os.path.abspath(os.path.expanduser(location)))
    scheme, rest = location.split("://", 1)
    return f"{scheme.lower()}://{rest.rstrip('/')}"


def _under(target: str, root: str) -> bool:
    if root.endswith("://"):  # a whole scheme, e.g. "s3://"
        return target.startswith(root)
    root = root.rstrip("/")
    return target == root or target.startswith(root + "/")


def validate_dataset_uri(uri: str, allowed_roots: Sequence[str]) -> str:
    """Check a dataset URI and return its canonical form (local paths: absolute, resolved).

    Parameters
    ----------
    uri:
        Local path (absolute or relative to the service's working dir), ``file://`` URI, or a
        pyarrow filesystem URI such as ``s3://bucket/prefix``.
    allowed_roots:
        The URI must lie at or below one of these (compared after resolving symlinks).

    Raises
    ------
    InvalidRequest
        On ``..`` segments, control characters, or a location outside every allowed root.
    """
    if not uri or not uri.strip():
        raise InvalidRequest("dataset.uri must be non-empty")
    if any(ord(c) < 32 for c in uri):
        raise InvalidRequest(f"dataset.uri contains control characters: {uri!r}")
    path_part = uri.split("://", 1)[1] if _is_uri(uri) else uri
    if ".." in path_part.replace("\\", "/").split("/"):
        raise InvalidRequest(f"dataset.uri must not contain '..' segments: {uri!r}")
    target = _canonical(uri)
    for root in allowed_roots:
        if _under(target, _canonical(root)):
            return target
    raise InvalidRequest(
        f"dataset.uri {uri!r} is outside the allowed dataset roots {list(allowed_roots)}; "
        "set SAELECT_ALLOWED_ROOTS to allow it"
    )


def _local_path(value: str) -> bool:
    """Whether a feature ``model`` names a local path (else a name in a local model cache)."""
    return os.path.isabs(value) or value.startswith((".", "~")) or os.path.exists(value)


def check_model_files(feature: FeatureSpec, allowed_roots: Sequence[str]) -> None:
    """Refuse a feature ``weights`` file, or a ``model`` that is a local path, outside every
    allowed root (the service reads them on its workers, as it reads the dataset).

    Raises
    ------
    InvalidRequest
        Naming the field, for ``..`` segments or a location outside the allowed roots.
    """
    for name in ("weights", "model"):
        value = getattr(feature, name)
        if value is None or (name == "model" and not _local_path(value)):
            continue
        if _is_uri(value) or ".." in value.replace("\\", "/").split("/"):
            raise InvalidRequest(f"dataset.feature.{name} must be a local path without '..'")
        target = _canonical(value)
        if not any(_under(target, _canonical(root)) for root in allowed_roots):
            raise InvalidRequest(
                f"dataset.feature.{name} {value!r} is outside the allowed roots "
                f"{list(allowed_roots)}; set SAELECT_ALLOWED_ROOTS to allow it"
            )


def check_module_allowed(module: str | None, allowed_modules: Sequence[str]) -> None:
    """Refuse a ``module`` extractor unless allow-listed.

    ``module`` is ``pkg.mod:factory``; an allow-list entry matches it exactly, or names its
    module (``pkg.mod``) or a parent package (``pkg``).

    Raises
    ------
    InvalidRequest
        When ``module`` is missing or not allow-listed.
    """
    if not module:
        raise InvalidRequest("dataset.feature.module is required for kind 'module'")
    mod = module.split(":", 1)[0]
    for entry in allowed_modules:
        if module == entry or mod == entry or mod.startswith(entry + "."):
            return
    raise InvalidRequest(
        f"feature module {module!r} is not allow-listed; the server operator can allow it with "
        "SAELECT_ALLOWED_MODULES"
    )


def job_spec_from_dict(
    d: Mapping[str, Any],
    *,
    allowed_roots: Sequence[str],
    allowed_modules: Sequence[str] = (),
) -> JobSpec:
    """Build and validate a spec as ``POST /v1/jobs`` does (URI roots, module allow-list).

    The returned spec's ``dataset.uri`` is the canonical location (see
    ``validate_dataset_uri``).

    Raises
    ------
    InvalidRequest
        With a message naming the offending field.
    """
    spec = _build(d)
    uri = validate_dataset_uri(spec.dataset.uri, allowed_roots)
    if spec.dataset.feature.kind == "module":
        check_module_allowed(spec.dataset.feature.module, allowed_modules)
    check_model_files(spec.dataset.feature, allowed_roots)
    return dataclasses.replace(spec, dataset=dataclasses.replace(spec.dataset, uri=uri))


SAE_NULLABLE = frozenset({"units", "aux_k", "max_train_samples"})
"""SAEConfig fields for which None is a meaningful value."""


def job_spec_from_model(model: JobSpecModel, settings: Settings) -> JobSpec:
    """Convert the validated pydantic body of ``POST /v1/jobs`` into a ``JobSpec``."""
    d = model.model_dump(exclude={"sae", "scores", "scoring"})
    d["scores"] = {k: v for k, v in model.scores.model_dump().items() if v is not None}
    d["scoring"] = {k: v for k, v in model.scoring.model_dump().items() if v is not None}
    # null means "default" except where None is itself a setting (units, aux_k, max_train_samples)
    d["sae"] = {
        k: v
        for k, v in model.sae.model_dump(exclude_unset=True).items()
        if v is not None or k in SAE_NULLABLE
    }
    return job_spec_from_dict(
        d, allowed_roots=settings.allowed_roots, allowed_modules=settings.allowed_modules
    )
