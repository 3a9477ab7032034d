"""Figures of the training benchmark, from its results JSONL, into docs/figures/.

    python benchmarks/train_plots.py --results results/train.jsonl --out docs/figures

Per task and path (``via``: http or inprocess), ``train_<task>_<via>_<kind>.png`` with kind:
- ``acc_vs_samples``: final test accuracy against samples processed (share of N E) for every
  policy, mean over seeds with a ±1 std bar; full data as a band.
- ``learning_curves``: test accuracy per epoch of full data and of full data for fewer epochs
  (mean over seeds): whether the regime still gains from more data and epochs.
- ``coverage_usage``: coverage (share of samples seen so far) and the spread of per-sample usage
  counts over epochs, ``factor`` vs ``rs2`` (mean over seeds).
- ``lambda_RD``: lambda(t) with the mean R and D of each epoch's selection.
- ``ablation``: every ``factor`` variant per ratio, sorted, against ``rs2`` and full data for
  fewer epochs (ratios where at least three variants ran).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from benchmarks.train_report import row_name, runs_of, sections
from benchmarks.train_runs import read_results

REPO = Path(__file__).resolve().parents[1]
SHOWN_VARIANTS = frozenset({"service_default", "qd_gumbel1", "quotas_dyncov"})
"""factor variants drawn with the policies in ``acc_vs_samples``: the current defaults (spelled
out: ``qd_gumbel1``) and the previous ones (``quotas_dyncov``)."""
DEFAULT_VARIANTS = frozenset({"service_default", "qd_gumbel1"})
"""Variants that are factor's current defaults (green in the ablation figure)."""


def plot_acc_vs_samples(runs: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Accuracy against samples processed per policy (factor variants left out: they have the
    ablation table); False when there is nothing to plot."""
    by: dict[str, dict[float, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if "[" in row_name(r) and r.get("variant") not in SHOWN_VARIANTS:
            continue  # the other variants have the ablation figure and table
        by[row_name(r)][float(r["ratio"])].append((r["sample_fraction"], r["final_acc"]))
    if not by:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    full = by.pop("full", None)
    if full:
        accs = [a for pts in full.values() for _, a in pts]
        m, s = 100 * np.mean(accs), 100 * np.std(accs)
        ax.axhspan(m - s, m + s, color="0.85", label=f"full ({len(accs)} seeds) ±1 std")
        ax.axhline(m, color="0.3", lw=1)
    for name in sorted(by):
        xs, ys, es = [], [], []
        for ratio in sorted(by[name]):
            pts = by[name][ratio]
            xs.append(np.mean([f for f, _ in pts]))
            ys.append(100 * np.mean([a for _, a in pts]))
            es.append(100 * np.std([a for _, a in pts]))
        style = "-o" if name.startswith("factor") else "--s" if name == "full_fewer" else ":."
        ax.errorbar(
            xs, ys, yerr=es, fmt=style, capsize=3, label=name, lw=1.5 if "factor" in name else 1
        )
    ax.set_xlabel("samples processed (share of full data, N·E)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_learning_curves(runs: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Accuracy per epoch of full data and full data for fewer epochs."""
    curves: dict[str, list[list[float]]] = defaultdict(list)
    for r in runs:
        if r["policy"] == "full":
            curves[f"full, E = {r['job_epochs']}"].append(r["acc_curve"])
        elif r["policy"] == "full_fewer":
            curves[f"full_fewer, E = {r['job_epochs']}"].append(r["acc_curve"])
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in sorted(curves, key=lambda s: -int(s.rsplit("= ", 1)[1])):
        arr = np.asarray(curves[name], dtype=np.float64) * 100
        ep = np.arange(1, arr.shape[1] + 1)
        m = arr.mean(axis=0)
        ax.plot(ep, m, marker=".", label=f"{name} ({arr.shape[0]} seeds)")
        if arr.shape[0] > 1:
            ax.fill_between(ep, m - arr.std(axis=0), m + arr.std(axis=0), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    lo = min(np.min(np.asarray(c)) for cs in curves.values() for c in cs) * 100
    ax.set_ylim(max(lo, 100 * np.max([c[-1] for cs in curves.values() for c in cs]) - 15), None)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _diag_series(
    runs: list[dict[str, Any]], name: str, ratio: float, key: str
) -> np.ndarray | None:
    """float (seeds, epochs) of a diagnostics field, or None."""
    rows = [
        [e[key] for e in r["diagnostics"]["epochs"]]
        for r in runs
        if row_name(r) == name and float(r["ratio"]) == ratio and r.get("diagnostics")
    ]
    rows = [row for row in rows if all(v is not None for v in row)]
    if not rows:
        return None
    n = min(len(row) for row in rows)
    return np.asarray([row[:n] for row in rows], dtype=np.float64)


def plot_coverage_usage(runs: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Coverage and usage spread over epochs, factor vs rs2, every ratio both ran."""
    ratios = sorted(
        {float(r["ratio"]) for r in runs if r["policy"] == "factor" and r.get("diagnostics")}
        & {float(r["ratio"]) for r in runs if r["policy"] == "rs2" and r.get("diagnostics")}
    )
    if not ratios:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ratio in enumerate(ratios):
        c = colors[i % len(colors)]
        for name, ls in (("factor", "-"), ("rs2", "--")):
            cov = _diag_series(runs, name, ratio, "coverage")
            use = _diag_series(runs, name, ratio, "usage_std")
            if cov is None or use is None:
                continue
            ep = np.arange(1, cov.shape[1] + 1)
            a1.plot(ep, cov.mean(0), ls, color=c, label=f"{name} r={ratio:g}")
            a2.plot(ep, use.mean(0), ls, color=c, label=f"{name} r={ratio:g}")
    a1.set_xlabel("epoch")
    a1.set_ylabel("coverage (share of samples seen)")
    a2.set_xlabel("epoch")
    a2.set_ylabel("std of per-sample usage counts")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_lambda_rd(runs: list[dict[str, Any]], path: Path, title: str) -> bool:
    """lambda(t) and mean R, D of the selection per epoch, for factor at each ratio."""
    ratios = sorted(
        {float(r["ratio"]) for r in runs if row_name(r) == "factor" and r.get("diagnostics")}
    )
    if not ratios:
        return False
    width = max(4 * len(ratios), 6)
    fig, axes = plt.subplots(1, len(ratios), figsize=(width, 3.8), squeeze=False)
    for ax, ratio in zip(axes[0], ratios, strict=True):
        for key, style in (("lambda", "k-"), ("mean_R", "b-o"), ("mean_D", "r-s")):
            s = _diag_series(runs, "factor", ratio, key)
            if s is None:
                continue
            ep = np.arange(1, s.shape[1] + 1)
            ax.plot(ep, s.mean(0), style, ms=3, label=key)
        ax.set_title(f"factor r = {ratio:g}")
        ax.set_xlabel("epoch")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_ablation(runs: list[dict[str, Any]], path: Path, title: str) -> bool:
    """One panel per ratio: every factor variant's final accuracy (mean, ±1 std over seeds),
    sorted, with rs2 and full data for fewer epochs at that ratio as reference lines; False
    when no ratio has at least three variants."""
    acc: dict[float, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    frac: dict[tuple[float, str], list[float]] = defaultdict(list)
    for r in runs:
        if r["policy"] == "factor":
            key = (float(r["ratio"]), str(r.get("variant", "default")))
            acc[key[0]][key[1]].append(100 * r["final_acc"])
            frac[key].append(float(r["sample_fraction"]))
        elif r["policy"] in ("rs2", "full_fewer"):
            acc[float(r["ratio"])]["@" + r["policy"]].append(100 * r["final_acc"])
    ratios = [ratio for ratio in sorted(acc) if sum(not v.startswith("@") for v in acc[ratio]) >= 3]
    if not ratios:
        return False
    fig, axes = plt.subplots(1, len(ratios), figsize=(5.5 * len(ratios), 7), squeeze=False)
    for ax, ratio in zip(axes[0], ratios, strict=True):
        variants = {v: xs for v, xs in acc[ratio].items() if not v.startswith("@")}
        refs = {v[1:]: xs for v, xs in acc[ratio].items() if v.startswith("@")}
        order = sorted(variants, key=lambda v: float(np.mean(variants[v])))
        means = [float(np.mean(variants[v])) for v in order]
        ys = np.arange(len(order))
        ax.barh(
            ys,
            means,
            xerr=[float(np.std(variants[v])) for v in order],
            color=["tab:green" if v in DEFAULT_VARIANTS else "tab:blue" for v in order],
            alpha=0.8,
            capsize=2,
        )
        labels = []
        for v in order:
            f = float(np.mean(frac[(ratio, v)]))
            budget = f" [samples {f:.2f}]" if abs(f - ratio) > 0.005 else ""
            labels.append(f"{v} ({len(variants[v])}){budget}")
        ax.set_yticks(ys, labels, fontsize=7)
        for (name, xs), style in zip(sorted(refs.items()), ("--", ":"), strict=True):
            ax.axvline(float(np.mean(xs)), color="k", ls=style, label=f"{name} ({len(xs)})")
        lo = min([*means, *(float(np.mean(xs)) for xs in refs.values())])
        ax.set_xlim(lo - 2.0, max([*means, *(float(np.mean(xs)) for xs in refs.values())]) + 1.0)
        ax.set_xlabel("final test accuracy (%)")
        ax.set_title(f"r = {ratio:g}")
        ax.grid(axis="x", alpha=0.3)
        if refs:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def make_plots(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """Every figure for every (task, path) in ``records``; returns the files written."""
    written = []
    for task, via in sections(records):
        runs = runs_of(records, task, via)
        name = f"{task} ({via})"
        for suffix, fn, title in (
            ("acc_vs_samples", plot_acc_vs_samples, f"{name}: accuracy vs samples processed"),
            ("learning_curves", plot_learning_curves, f"{name}: full-data learning curves"),
            ("coverage_usage", plot_coverage_usage, f"{name}: factor vs rs2"),
            ("lambda_RD", plot_lambda_rd, f"{name}: lambda(t), mean R and D of the selection"),
            ("ablation", plot_ablation, f"{name}: factor variants (green: current defaults)"),
        ):
            path = out / f"train_{task}_{via}_{suffix}.png"
            if fn(runs, path, title):
                written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Write the figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--results",
        type=Path,
        nargs="+",
        default=[REPO / "results" / "train.jsonl"],
        help="one or more JSONL files; for a run key in several, the later file wins",
    )
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "figures")
    args = ap.parse_args(argv)
    records = [rec for path in args.results for rec in read_results(path)]
    for p in make_plots(records, args.out):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
