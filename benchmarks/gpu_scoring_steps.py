"""The work ``benchmarks/gpu_scoring.py`` times: synthetic sparse-dictionary features made on the
device, the TopK SAE fit on device-resident rows, the encode of every row (on the device, and
with the codes copied to host memory) and the host side of scoring (factor counts, p, R and D).

Used by benchmarks/gpu_scoring.py; kept apart so that the runner stays short.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from saelect.workers.codes import SparseCodes
from saelect.workers.factors import factor_counts, factor_frequencies
from saelect.workers.sae import SAEConfig, TopKSAE
from saelect.workers.sae_fit import FiringCounters, sae_train_step
from saelect.workers.scores import ScoreConfig, score_codes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(n: int, d: int, atoms: int, active: int, device: torch.device, seed: int) -> Any:
    """float32 (n, d) on ``device``: sum of ``active`` random atoms with uniform weights + noise."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dict_AD = torch.randn(atoms, d, generator=gen, device=device)
    dict_AD /= dict_AD.norm(dim=1, keepdim=True)
    out_ND = torch.empty(n, d, device=device)
    chunk = 1 << 20
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        idx_BA = torch.randint(0, atoms, (b, active), generator=gen, device=device)
        w_BA = torch.rand(b, active, generator=gen, device=device) * 3.0
        x_BD = torch.nn.functional.embedding_bag(
            idx_BA, dict_AD, per_sample_weights=w_BA, mode="sum"
        )
        x_BD += 0.05 * torch.randn(b, d, generator=gen, device=device)
        out_ND[start : start + b] = x_BD
    return out_ND


def fit(
    x_ND: torch.Tensor, config: SAEConfig, units: int, device: torch.device
) -> tuple[TopKSAE, dict[str, float]]:
    """Train on the device-resident rows; returns the model and timing/quality figures."""
    n, d = x_ND.shape
    model = TopKSAE(d, units, config.k, seed=config.seed).to(device)
    with torch.no_grad():
        model.mean_D.copy_(x_ND.mean(dim=0))
        model.std_D.copy_(x_ND.std(dim=0).clamp_min(1e-8))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    counters = FiringCounters(units, device)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    bs = config.batch_size
    # warm-up (kernels, allocator), not timed
    sae_train_step(model, optimizer, x_ND[:bs], config, counters=counters)
    with torch.no_grad():
        mse_before = float(model(x_ND[: min(n, 65536)]).mse)
    sync(device)
    t0 = time.perf_counter()
    steps = seen = 0
    last = float("nan")
    for _ in range(config.epochs):
        perm = torch.randperm(n, generator=gen, device=device)
        for start in range(0, n, bs):
            batch_BD = x_ND[perm[start : start + bs]]
            last = sae_train_step(model, optimizer, batch_BD, config, counters=counters)
            steps += 1
            seen += batch_BD.shape[0]
    sync(device)
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        mse_after = float(model(x_ND[: min(n, 65536)]).mse)
    return model, {
        "fit_rows": n,
        "fit_epochs": config.epochs,
        "fit_steps": steps,
        "fit_samples_seen": seen,
        "fit_seconds": seconds,
        "fit_samples_per_s": seen / seconds,
        "fit_steps_per_s": steps / seconds,
        "mse_before": mse_before,
        "mse_after": mse_after,
        "last_batch_mse": last,
    }


def encode_all(
    model: TopKSAE, x_ND: torch.Tensor, batch: int, device: torch.device
) -> tuple[SparseCodes, dict[str, float]]:
    """Encode every row: device-only throughput, then with the copy of the codes to the host.

    The rows each pass really encoded are counted (``encode_rows_device``, ``encode_rows_host``)
    and the throughputs divide those counts, so a loop that skips rows shows in the report.
    """
    n, k = x_ND.shape[0], model.k
    with torch.inference_mode():
        model.encode_topk(x_ND[:batch])  # warm-up
        sync(device)
        rows_device = 0
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            rows_device += model.encode_topk(x_ND[start : start + batch]).top_indices_BK.shape[0]
        sync(device)
        device_s = time.perf_counter() - t0

        ids = torch.zeros((n, k), dtype=torch.int32, pin_memory=device.type == "cuda")
        vals = torch.zeros((n, k), dtype=torch.float16, pin_memory=device.type == "cuda")
        rows_host = 0
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            out = model.encode_topk(x_ND[start : start + batch])
            stop = start + out.top_indices_BK.shape[0]
            ids[start:stop].copy_(out.top_indices_BK.to(torch.int32), non_blocking=True)
            vals[start:stop].copy_(out.top_acts_BK.clamp(max=65504.0).half(), non_blocking=True)
            rows_host += stop - start
        sync(device)
        host_s = time.perf_counter() - t0
    codes = SparseCodes(ids.numpy(), vals.numpy())
    return codes, {
        "encode_rows": n,
        "encode_rows_device": rows_device,
        "encode_rows_host": rows_host,
        "encode_batch": batch,
        "encode_device_seconds": device_s,
        "encode_device_samples_per_s": rows_device / device_s,
        "encode_to_host_seconds": host_s,
        "encode_to_host_samples_per_s": rows_host / host_s,
    }


def host_scores(codes: SparseCodes, units: int) -> tuple[np.ndarray, dict[str, float]]:
    """Counts, p, raw R and D on the host (numpy), timed; returns p (M,) and the figures."""
    t0 = time.perf_counter()
    counts = factor_counts(codes, units)
    p = factor_frequencies(counts, codes.num_samples)
    t1 = time.perf_counter()
    r, d = score_codes(codes, p, ScoreConfig())
    t2 = time.perf_counter()
    return p, {
        "counts_seconds": t1 - t0,
        "scores_seconds": t2 - t1,
        "scores_samples_per_s": codes.num_samples / (t2 - t1),
        "counted_active_entries": int(counts.sum()),
        "alive_units": int((p > 0).sum()),
        "scores_finite": bool(np.isfinite(r).all() and np.isfinite(d).all()),
        "mean_R": float(r.mean()),
        "mean_D": float(d.mean()),
    }
