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
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saelect.workers.factors import factor_counts, factor_frequencies  # noqa: E402
from saelect.workers.sae import SAEConfig  # noqa: E402
from saelect.workers.sae_files import save_sae  # noqa: E402

from benchmarks.gpu_scoring_checks import check_result, check_rows, compare_with_cpu  # noqa: E402
from benchmarks.gpu_scoring_steps import encode_all, fit, generate, host_scores, sync  # noqa: E402


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
    sync(device)
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
