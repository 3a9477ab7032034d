"""Selectors of the training benchmark: where a run's indices come from.

``InProcessSelector`` runs the service's policies and selection engine in this process over the
pipeline's single-process scoring (``score_in_process``, cached on disk per ``scoring_key``);
``HttpSelector`` asks a running ``saelect serve`` through ``client.SelectionClient``, and
``start_service`` starts one on loopback. Both have the client's interface (``create_job``,
``wait_ready``, ``plan``, ``indices``, ``weights``, ``feedback``, ``stats``, ``delete``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two float arrays (n,), average ranks for ties."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def scoring_key(spec: dict[str, Any]) -> str:
    """Identifies what a job's scoring depends on: data, features, SAE config, score forms."""
    part = {k: spec[k] for k in ("dataset", "sae") if k in spec}
    part["scores"] = spec.get("scores", {})
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ScoredData:
    """In-process scoring output of one dataset (one scoring key)."""

    R: np.ndarray
    """float64 (N,) representativeness, rank-normalized."""
    D: np.ndarray
    """float64 (N,) diversity, rank-normalized."""
    labels: np.ndarray | None
    """int64 (N,) labels or None."""
    code_ids: np.ndarray
    """int32 (N, k) active unit ids."""
    code_values: np.ndarray
    """float16 (N, k) activations."""
    p: np.ndarray
    """float64 (M,) factor frequencies."""
    scoring_s: float
    """Wall time of features + SAE fit + encode + scores when computed."""
    dead_share: float
    """Share of SAE units never active."""


def score_in_process(spec: dict[str, Any], cache_dir: Path | None) -> ScoredData:
    """Score a job's dataset with ``workers.scoring_local.score_single_process``, cached on disk.

    The pipeline's own single-process reference (the same samples, extractor fit, SAE and
    score functions as the distributed scoring), so in-process runs select what the service
    would select.
    """
    from saelect.workers.features import FeatureSpec
    from saelect.workers.sae import SAEConfig
    from saelect.workers.scores import ScoreConfig
    from saelect.workers.scoring_local import score_single_process

    key = scoring_key(spec)
    path = None if cache_dir is None else cache_dir / f"scores_{key}.npz"
    if path is not None and path.exists():
        z = np.load(path)
        return ScoredData(
            R=z["R"],
            D=z["D"],
            labels=z["labels"] if z["labels"].size else None,
            code_ids=z["code_ids"],
            code_values=z["code_values"],
            p=z["p"],
            scoring_s=float(z["scoring_s"]),
            dead_share=float(z["dead_share"]),
        )
    ds = spec["dataset"]
    t0 = time.perf_counter()
    sc = score_single_process(
        ds["uri"],
        FeatureSpec(**ds["feature"]),
        ds.get("label_column"),
        SAEConfig(**spec.get("sae", {})),
        ScoreConfig(**spec.get("scores", {})),
    )
    out = ScoredData(
        R=np.asarray(sc.R, dtype=np.float64),
        D=np.asarray(sc.D, dtype=np.float64),
        labels=sc.labels,
        code_ids=np.asarray(sc.codes.ids),
        code_values=np.asarray(sc.codes.values),
        p=np.asarray(sc.p, dtype=np.float64),
        scoring_s=time.perf_counter() - t0,
        dead_share=float(np.mean(sc.p == 0)),
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            R=out.R,
            D=out.D,
            labels=out.labels if out.labels is not None else np.zeros(0, np.int64),
            code_ids=out.code_ids,
            code_values=out.code_values,
            p=out.p,
            scoring_s=out.scoring_s,
            dead_share=out.dead_share,
        )
        tmp.replace(path)
    return out


class InProcessSelector:
    """``client.SelectionClient``'s interface over in-process ``SingleProcessSelector`` engines.

    The same policies and engine as the service, without Ray or HTTP; scoring runs in this
    process (``score_in_process``). ``weights`` gives InfoBatch's loss weights, like
    ``GET .../weights``.
    """

    def __init__(self, cache_dir: Path | None) -> None:
        self.cache_dir = cache_dir
        self._jobs: dict[str, dict[str, Any]] = {}
        self._scored: dict[str, ScoredData] = {}
        self.scoring_s: dict[str, float] = {}

    def scored(self, spec: dict[str, Any]) -> ScoredData:
        """The scoring of ``spec``'s dataset (computed once per scoring key)."""
        key = scoring_key(spec)
        if key not in self._scored:
            self._scored[key] = score_in_process(spec, self.cache_dir)
        return self._scored[key]

    def create_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Build the policy and engine; factor policies score the data first."""
        import pyarrow.parquet as pq
        from saelect.service.policies import PolicyConfig, make_policy
        from saelect.service.selection.engine import SingleProcessSelector
        from saelect.workers.shard_data import ShardData

        policy = make_policy(PolicyConfig(**spec["policy"]))
        label_col = spec["dataset"].get("label_column")
        if spec["policy"]["name"] in ("factor", "factor_loss"):  # the scored policies
            sc = self.scored(spec)
            data = ShardData(
                0,
                sc.R.shape[0],
                R=sc.R,
                D=sc.D,
                labels=sc.labels,
                code_ids=sc.code_ids,
                code_values=sc.code_values,
                p=sc.p,
            )
        else:
            cols = [label_col] if label_col else []
            table = pq.read_table(spec["dataset"]["uri"], columns=cols or None)
            labels = (
                np.asarray(table.column(label_col).to_numpy(), dtype=np.int64)
                if label_col
                else None
            )
            data = ShardData(0, table.num_rows, labels=labels)
        job_id = f"job{len(self._jobs)}"
        self._jobs[job_id] = {
            "engine": SingleProcessSelector(policy, data),
            "epochs": [],
            "spec": spec,
        }
        return {"id": job_id, "phase": "ready"}

    def wait_ready(self, job_id: str, timeout: float = 600.0) -> dict[str, Any]:
        """In-process jobs are ready on creation."""
        return {"id": job_id, "phase": "ready"}

    def plan(self, job_id: str, world_size: int = 1) -> dict[str, Any]:
        """Same shape as ``GET /v1/jobs/{id}/plan``."""
        from saelect.service.selection.partition import per_rank_length

        engine = self._jobs[job_id]["engine"]
        sizes = engine.plan()
        n = engine.num_samples
        return {
            "world_size": world_size,
            "epochs": [
                {"epoch": t, "size": s, "per_rank": per_rank_length(s, world_size)}
                for t, s in enumerate(sizes)
            ],
            "sample_fraction": sum(sizes) / (n * len(sizes)) if n and sizes else 0.0,
        }

    def _epoch(self, job_id: str, epoch: int) -> Any:
        job = self._jobs[job_id]
        while len(job["epochs"]) <= epoch:
            job["epochs"].append(job["engine"].step())
        return job["epochs"][epoch]

    def indices(self, job_id: str, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """int64 (per_rank,) indices of ``rank`` (selects earlier epochs first, in order)."""
        from saelect.service.selection.partition import rank_indices

        return rank_indices(self._epoch(job_id, epoch).indices, rank, world_size)

    def weights(self, job_id: str, epoch: int) -> np.ndarray | None:
        """float (size,) loss weights of ``epoch`` aligned with rank 0 of 1, or None."""
        return self._epoch(job_id, epoch).weights

    def feedback(
        self, job_id: str, epoch: int, indices: np.ndarray, losses: np.ndarray
    ) -> dict[str, Any]:
        """Per-sample losses of ``epoch``."""
        applied = self._jobs[job_id]["engine"].feedback(indices, losses)
        return {"applied": applied}

    def stats(self, job_id: str, epoch: int) -> dict[str, Any]:
        """The engine's statistics of a selected epoch."""
        return dict(self._epoch(job_id, epoch).stats)

    def delete(self, job_id: str) -> None:
        """Forget a job."""
        self._jobs.pop(job_id, None)

    def close(self) -> None:
        """Nothing to release."""


class HttpSelector:
    """``client.SelectionClient`` with the driver's interface (``weights`` serves rank 0 of 1)."""

    def __init__(self, url: str, token: str | None = None) -> None:
        from saelect.client import SelectionClient

        self.client = SelectionClient(url, token=token, timeout=120.0)
        self.scoring_s: dict[str, float] = {}

    def weights(self, job_id: str, epoch: int) -> np.ndarray:
        """float32 (size,) loss weights of ``epoch`` (all 1 unless the policy reweights)."""
        return self.client.weights(job_id, epoch, 0, 1)

    def __getattr__(self, name: str) -> Any:
        if name in ("create_job", "wait_ready", "plan", "indices", "feedback", "stats", "delete"):
            return getattr(self.client, name)
        raise AttributeError(name)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self.client.close()


def start_service(store: Path, port: int, allowed_root: Path) -> subprocess.Popen:
    """Start ``saelect serve`` on loopback (its own process group); returns once it answers."""
    import httpx

    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["SAELECT_ALLOWED_ROOTS"] = json.dumps([str(allowed_root)])
    exe = Path(sys.executable).with_name("saelect")
    cmd = [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), "--store", str(store)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"saelect serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    proc.terminate()
    raise RuntimeError("saelect serve did not answer /healthz within 180 s")
