"""Self-checks of ``benchmarks/gpu_scoring.py``: its figures (rows counted, throughputs, the
SAE's loss, valid codes, factor counts) and the device's codes against the CPU path's.

Each check goes into the script's ``Checks`` (``benchmarks/gpu_checks.py``) with its measured
value and expectation; the script exits 1 when one fails.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from saelect.workers.codes import SparseCodes
from saelect.workers.sae import TopKSAE
from saelect.workers.sae_encode import encode
from saelect.workers.scores import ScoreConfig, score_codes

from benchmarks.gpu_checks import Checks, finite_positive


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
