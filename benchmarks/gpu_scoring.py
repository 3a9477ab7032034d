"""SAE fit and encode throughput on synthetic features, on a GPU (H200) or, for a smoke check, CPU.

One call, well under 8 minutes on an H200 with the defaults (10M x 512-d features, M = 4096,
k = 32):

1. generate N sparse-dictionary features on the device (each row a non-negative mix of a few of
   ``--atoms`` random directions plus noise, seeded), so the SAE has structure to find;
2. fit the TopK SAE with `workers.sae_fit.sae_train_step` on ``--fit-samples`` rows already on the
   device (samples/s of training, MSE before and after);
3. encode all N rows with `TopKSAE.encode_topk` (samples/s on the device, and including the copy
   of the int32 ids / float16 values to host memory, which is what a shard stores);
4. the host side of scoring on those codes: factor counts, p, R and D (`workers.scores`);
5. checks of its own results (`benchmarks.gpu_checks`): every row encoded and counted, every
   throughput finite and positive, the SAE's loss down, and the device's codes of ``--check-rows``
   rows (spread over all N) equal to the CPU path's (`workers.sae_encode.encode` on a CPU copy of
   the model), and so the top half of those rows by R. On a GPU with TF32 a small share of rows may
   swap a near-tied unit: up to ``--tolerance`` (default 2 %) of the active entries and of the
   selected rows may differ; on the CPU none may.

Prints a summary and writes JSON to ``--out`` (default ``$OUT/gpu_scoring.json`` when $OUT is
set, else ./gpu_scoring.json), with the checks under ``"checks"``; exits 1 when a check fails.
``--save-dir`` also writes the codes (``codes.bin``) and the SAE, for a test to recompute from.

    python benchmarks/gpu_scoring.py                          # on the H200
    python benchmarks/gpu_scoring.py --device cpu --n 20000 --fit-samples 8000 --units 256  # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saelect.workers.codes import SparseCodes  # noqa: E402
from saelect.workers.factors import factor_counts, factor_frequencies  # noqa: E402
from saelect.workers.sae import SAEConfig, TopKSAE  # noqa: E402
from saelect.workers.sae_encode import encode  # noqa: E402
from saelect.workers.sae_files import save_sae  # noqa: E402
from saelect.workers.sae_fit import FiringCounters, sae_train_step  # noqa: E402
from saelect.workers.scores import ScoreConfig, score_codes  # noqa: E402

from benchmarks.gpu_checks import Checks, finite_positive  # noqa: E402


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
    steps = seen = 0
    last = float("nan")
    for _ in range(config.epochs):
        perm = torch.randperm(n, generator=gen, device=device)
        for start in range(0, n, bs):
            batch_BD = x_ND[perm[start : start + bs]]
            last = sae_train_step(model, optimizer, batch_BD, config, counters=counters)
            steps += 1
            seen += batch_BD.shape[0]
    _sync(device)
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
        _sync(device)
        rows_device = 0
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            rows_device += model.encode_topk(x_ND[start : start + batch]).top_indices_BK.shape[0]
        _sync(device)
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
        _sync(device)
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


def check_rows(n: int, count: int) -> np.ndarray:
    """int64 (<= count,) rows spread evenly over [0, n), always with the first and the last."""
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))


def compare_with_cpu(
    model: TopKSAE, x_ND: torch.Tensor, codes: SparseCodes, p: np.ndarray, rows: np.ndarray
) -> dict[str, float]:
    """The device's codes of ``rows`` against the CPU path's, and the top half of them by R.

    The CPU path is what a CPU scoring worker runs: `workers.sae_encode.encode` on a CPU copy of the
    model, in float32. Returns the share of active (value > 0) entries both agree on (over
    their union), the largest value difference on shared entries relative to the largest value,
    and the share of the top half of ``rows`` by R (with the global p) that both select.
    """
    units = model.units
    cpu_model = copy.deepcopy(model).to("cpu").eval()
    cpu_model.encode_dtype = "float32"
    feats = x_ND[torch.from_numpy(rows).to(x_ND.device)].float().cpu().numpy()
    ref = encode(cpu_model, feats, batch_size=8192)
    got = codes.take(rows)
    dense_got, dense_ref = got.to_dense(units), ref.to_dense(units)  # (S, M)
    act_got, act_ref = dense_got > 0, dense_ref > 0
    union = int((act_got | act_ref).sum())
    shared = act_got & act_ref
    agree = float(shared.sum() / union) if union else 1.0
    scale = float(np.abs(dense_ref).max()) or 1.0
    diff = np.abs(dense_got - dense_ref)[shared]
    value_err = float(diff.max() / scale) if diff.size else 0.0
    r_got, _ = score_codes(got, p, ScoreConfig())
    r_ref, _ = score_codes(ref, p, ScoreConfig())
    m = max(1, rows.size // 2)
    top_got = set(np.argsort(-r_got, kind="stable")[:m].tolist())
    top_ref = set(np.argsort(-r_ref, kind="stable")[:m].tolist())
    return {
        "check_rows": int(rows.size),
        "cpu_code_agreement": agree,
        "cpu_value_max_rel_diff": value_err,
        "cpu_selection_overlap": len(top_got & top_ref) / m,
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


def check_result(result: dict[str, Any], codes: SparseCodes, tolerance: float) -> Checks:
    """The script's own checks of ``result`` (see the module docstring)."""
    n, units, k = result["n"], result["units"], result["k"]
    c = Checks()
    c.add(
        "rows_counted",
        result["encode_rows_device"] == result["encode_rows_host"] == codes.num_samples == n,
        value=[result["encode_rows_device"], result["encode_rows_host"], codes.num_samples],
        expect=f"every row encoded and copied: all == n = {n}",
    )
    c.add(
        "fit_rows_counted",
        result["fit_rows"] * result["fit_epochs"] == result["fit_samples_seen"],
        value=result["fit_samples_seen"],
        expect=f"fit_rows x fit_epochs = {result['fit_rows'] * result['fit_epochs']}",
    )
    rates = {key: v for key, v in result.items() if key.endswith("_per_s")}
    c.add(
        "throughput_finite_positive",
        finite_positive(*rates.values()),
        value=rates,
        expect="every *_per_s finite and > 0",
    )
    c.add(
        "sae_loss_down",
        finite_positive(result["mse_after"]) and result["mse_after"] < result["mse_before"],
        value=[result["mse_before"], result["mse_after"]],
        expect="finite MSE after the fit, below the MSE before",
    )
    ids_ok = bool(((codes.ids >= 0) & (codes.ids < units)).all())
    distinct = bool((np.diff(np.sort(codes.ids, axis=1), axis=1) > 0).all()) if k > 1 else True
    values_ok = bool(np.isfinite(codes.values).all() and (codes.values >= 0).all())
    c.add(
        "codes_valid",
        ids_ok and distinct and values_ok,
        value={"ids_in_range": ids_ok, "ids_distinct": distinct, "values_finite": values_ok},
        expect=f"ids in [0, {units}) and distinct per row; values finite and >= 0",
    )
    if "counted_active_entries" in result:
        active = int((codes.values > 0).sum())
        c.add(
            "factor_counts_total",
            result["counted_active_entries"] == active and result["alive_units"] > 0,
            value=[result["counted_active_entries"], result["alive_units"]],
            expect=f"counts sum to the {active} active entries; some unit alive",
        )
        c.add(
            "scores_finite", result["scores_finite"], value=result["scores_finite"], expect="True"
        )
    floor = 1.0 - tolerance
    for key in ("cpu_code_agreement", "cpu_selection_overlap"):
        c.add(key, result[key] >= floor, value=result[key], expect=f">= {floor:g}")
    c.add(
        "cpu_value_max_rel_diff",
        result["cpu_value_max_rel_diff"] <= max(tolerance, 1e-3),
        value=result["cpu_value_max_rel_diff"],
        expect=f"<= {max(tolerance, 1e-3):g} (float16 codes)",
    )
    return c


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every check passed, else 1 (the JSON is written either way)."""
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
    p.add_argument("--check-rows", type=int, default=4096, help="rows compared with the CPU")
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="share of entries/selected rows that may differ from the CPU path "
        "(default 0.02 on a GPU, 0 on the CPU)",
    )
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--save-dir", type=Path, default=None, help="also write codes.bin and the SAE")
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
    score_stats: dict[str, float] = {}
    if args.skip_scores:
        p_M = factor_frequencies(factor_counts(codes, args.units), codes.num_samples)
    else:
        p_M, score_stats = host_scores(codes, args.units)
        print(f"host R/D: {score_stats['scores_samples_per_s']:,.0f} samples/s", flush=True)
    cpu_stats = compare_with_cpu(model, x_ND, codes, p_M, check_rows(args.n, args.check_rows))
    print(
        f"against the CPU path on {cpu_stats['check_rows']:,} rows: "
        f"{cpu_stats['cpu_code_agreement']:.4f} of active entries agree, "
        f"{cpu_stats['cpu_selection_overlap']:.4f} of the top half by R",
        flush=True,
    )
    del x_ND

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
        **cpu_stats,
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
    tolerance = args.tolerance if args.tolerance is not None else 0.02 * (device.type == "cuda")
    checks = check_result(result, codes, tolerance)
    result["checks"] = checks.to_json()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if args.save_dir is not None:
        args.save_dir.mkdir(parents=True, exist_ok=True)
        (args.save_dir / "codes.bin").write_bytes(codes.to_bytes())
        save_sae(model.to("cpu"), args.save_dir, config)
    print(f"total {result['total_seconds']:.1f} s; wrote {out}", flush=True)
    print(checks.summary(), flush=True)
    return 0 if checks.to_json()["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
