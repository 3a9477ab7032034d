"""SAE fit and encode throughput on synthetic features, on a GPU (H200) or, for a smoke check, CPU.

One call, well under 8 minutes on an H200 with the defaults (10M x 512-d features, M = 4096,
k = 32):

1. generate N sparse-dictionary features on the device (each row a non-negative mix of a few of
   ``--atoms`` random directions plus noise, seeded), so the SAE has structure to find;
2. fit the TopK SAE with `workers.sae.sae_train_step` on ``--fit-samples`` rows already on the
   device (samples/s of training, MSE before and after);
3. encode all N rows with `TopKSAE.encode_topk` (samples/s on the device, and including the copy
   of the int32 ids / float16 values to host memory, which is what a shard stores);
4. the host side of scoring on those codes: factor counts, p, R and D (`workers.scores`).

Prints a summary and writes JSON to ``--out`` (default ``$OUT/gpu_scoring.json`` when $OUT is
set, else ./gpu_scoring.json).

    python benchmarks/gpu_scoring.py                          # on the H200
    python benchmarks/gpu_scoring.py --device cpu --n 20000 --fit-samples 8000 --units 256  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from workers.codes import SparseCodes
from workers.factors import factor_counts, factor_frequencies
from workers.sae import FiringCounters, SAEConfig, TopKSAE, sae_train_step
from workers.scores import ScoreConfig, score_codes


def _sync(device: torch.device) -> None:
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
    _sync(device)
    t0 = time.perf_counter()
    steps = 0
    last = float("nan")
    for _ in range(config.epochs):
        perm = torch.randperm(n, generator=gen, device=device)
        for start in range(0, n, bs):
            last = sae_train_step(
                model, optimizer, x_ND[perm[start : start + bs]], config, counters=counters
            )
            steps += 1
    _sync(device)
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        mse_after = float(model(x_ND[: min(n, 65536)]).mse)
    return model, {
        "fit_rows": n,
        "fit_epochs": config.epochs,
        "fit_steps": steps,
        "fit_seconds": seconds,
        "fit_samples_per_s": n * config.epochs / seconds,
        "fit_steps_per_s": steps / seconds,
        "mse_before": mse_before,
        "mse_after": mse_after,
        "last_batch_mse": last,
    }


def encode_all(
    model: TopKSAE, x_ND: torch.Tensor, batch: int, device: torch.device
) -> tuple[SparseCodes, dict[str, float]]:
    """Encode every row: device-only throughput, then with the copy of the codes to the host."""
    n, k = x_ND.shape[0], model.k
    with torch.inference_mode():
        model.encode_topk(x_ND[:batch])  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            model.encode_topk(x_ND[start : start + batch])
        _sync(device)
        device_s = time.perf_counter() - t0

        ids = torch.empty((n, k), dtype=torch.int32, pin_memory=device.type == "cuda")
        vals = torch.empty((n, k), dtype=torch.float16, pin_memory=device.type == "cuda")
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            out = model.encode_topk(x_ND[start : start + batch])
            stop = start + out.top_indices_BK.shape[0]
            ids[start:stop].copy_(out.top_indices_BK.to(torch.int32), non_blocking=True)
            vals[start:stop].copy_(out.top_acts_BK.clamp(max=65504.0).half(), non_blocking=True)
        _sync(device)
        host_s = time.perf_counter() - t0
    codes = SparseCodes(ids.numpy(), vals.numpy())
    return codes, {
        "encode_rows": n,
        "encode_batch": batch,
        "encode_device_seconds": device_s,
        "encode_device_samples_per_s": n / device_s,
        "encode_to_host_seconds": host_s,
        "encode_to_host_samples_per_s": n / host_s,
    }


def host_scores(codes: SparseCodes, units: int) -> dict[str, float]:
    """Counts, p, raw R and D on the host (numpy), timed."""
    t0 = time.perf_counter()
    counts = factor_counts(codes, units)
    p = factor_frequencies(counts, codes.num_samples)
    t1 = time.perf_counter()
    r, d = score_codes(codes, p, ScoreConfig())
    t2 = time.perf_counter()
    return {
        "counts_seconds": t1 - t0,
        "scores_seconds": t2 - t1,
        "scores_samples_per_s": codes.num_samples / (t2 - t1),
        "alive_units": int((p > 0).sum()),
        "mean_R": float(r.mean()),
        "mean_D": float(d.mean()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000_000, help="rows to generate and encode")
    p.add_argument("--d", type=int, default=512, help="feature dim")
    p.add_argument("--units", type=int, default=4096, help="SAE units M")
    p.add_argument("--k", type=int, default=32, help="SAE k")
    p.add_argument("--atoms", type=int, default=2048, help="dictionary atoms of the data")
    p.add_argument("--active", type=int, default=8, help="atoms mixed per row")
    p.add_argument("--fit-samples", type=int, default=2_000_000, help="rows the SAE trains on")
    p.add_argument("--epochs", type=int, default=2, help="SAE epochs over the fit rows")
    p.add_argument("--batch-size", type=int, default=8192, help="SAE training batch")
    p.add_argument("--encode-batch", type=int, default=65536, help="rows per encode batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-tf32", action="store_true", help="keep fp32 matmuls (default: TF32)")
    p.add_argument("--skip-scores", action="store_true", help="skip the host-side R/D timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    tf32 = device.type == "cuda" and not args.no_tf32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    x_ND = generate(args.n, args.d, args.atoms, args.active, device, args.seed)
    _sync(device)
    gen_s = time.perf_counter() - t0
    print(f"generated {args.n:,} x {args.d} on {device} in {gen_s:.1f} s", flush=True)

    config = SAEConfig(
        units=args.units,
        k=args.k,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        device=str(device),
    )
    fit_rows = min(args.fit_samples, args.n)
    model, fit_stats = fit(x_ND[:fit_rows], config, args.units, device)
    print(
        f"SAE fit: {fit_stats['fit_samples_per_s']:,.0f} samples/s "
        f"({fit_stats['fit_steps_per_s']:.1f} steps/s of {args.batch_size}), "
        f"MSE {fit_stats['mse_before']:.3f} -> {fit_stats['mse_after']:.3f}",
        flush=True,
    )
    codes, enc_stats = encode_all(model, x_ND, args.encode_batch, device)
    print(
        f"encode: {enc_stats['encode_device_samples_per_s']:,.0f} samples/s on the device, "
        f"{enc_stats['encode_to_host_samples_per_s']:,.0f} samples/s with codes to host",
        flush=True,
    )
    del x_ND
    score_stats: dict[str, float] = {}
    if not args.skip_scores:
        score_stats = host_scores(codes, args.units)
        print(f"host R/D: {score_stats['scores_samples_per_s']:,.0f} samples/s", flush=True)

    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "tf32": tf32,
        "host_cpus": os.cpu_count(),
        "n": args.n,
        "d": args.d,
        "units": args.units,
        "k": args.k,
        "generate_seconds": gen_s,
        **fit_stats,
        **enc_stats,
        **score_stats,
        "peak_device_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else None,
        "total_seconds": time.perf_counter() - t_start,
    }
    out = args.out
    if out is None:
        out = (
            Path(os.environ["OUT"]) / "gpu_scoring.json"
            if os.environ.get("OUT")
            else Path("gpu_scoring.json")
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"total {result['total_seconds']:.1f} s; wrote {out}", flush=True)
    return result


if __name__ == "__main__":
    main()
