"""Tables of the data-regime sweep (issue 15) from the training bench's JSONL records.

    python benchmarks/train_regimes_report.py results/train_regimes.jsonl            # print
    python benchmarks/train_regimes_report.py results/train_regimes.jsonl --write    # into docs

``--write`` replaces the block between ``<!-- regimes:begin -->`` and ``<!-- regimes:end -->``
in docs/benchmarks_train.md. Per task: one row per (policy, variant, r) with the mean and seed
std of the final test accuracy (and balanced, head and tail accuracy for the long tail), the
samples processed (against N and against the deduplicated N), and what the selections served
(duplicate rows, mislabelled rows, tail-class rows, distinct images covered). Then the target
check per ratio: the best saelect policy against the best of ``rs2``, class-balanced ``rs2`` and
``full_fewer``, as a paired difference over the seeds both ran, against the noise floor (the
larger seed std of ``rs2`` and of that best baseline at that ratio).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.doc_block import replace_marked
from benchmarks.train_runs import read_results

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks_train.md"
BEGIN, END = "<!-- regimes:begin -->", "<!-- regimes:end -->"
SAELECT = (
    "factor",
    "factor_gumbel",
    "factor_loss",
    "factor_loss_eq",
    "factor_loss_clean",
    "factor_loss_clean_b1",
)
"""Bench policies that are saelect's own (scored) policies."""
BASELINES = ("rs2", "rs2_prop", "rs2_equal", "full_fewer")
"""The baselines of the target: random rotation, class-balanced rotation, fewer epochs."""


def row_name(r: dict[str, Any]) -> str:
    """``policy`` or ``policy[variant]``."""
    return r["policy"] if r["variant"] == "-" else f"{r['policy']}[{r['variant']}]"


def _ms(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    a = np.asarray(values, dtype=np.float64) * scale
    if a.size == 1:
        return f"{a[0]:.{digits}f}"
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}"


def group_runs(records: list[dict[str, Any]]) -> dict[tuple[str, str, float], list[dict]]:
    """(task, row name, ratio) -> run records (the last record of a key wins)."""
    by_key = {r["key"]: r for r in records if r.get("kind") == "run"}
    out: dict[tuple[str, str, float], list[dict]] = defaultdict(list)
    for r in by_key.values():
        out[(r["task"], row_name(r), float(r["ratio"]))].append(r)
    for runs in out.values():
        runs.sort(key=lambda r: r["seed"])
    return out


def task_table(task: str, groups: dict[tuple[str, str, float], list[dict]]) -> list[str]:
    """Markdown table of one task's rows, ordered by ratio then mean accuracy."""
    keys = [k for k in groups if k[0] == task]
    keys.sort(key=lambda k: (k[2], -np.mean([r["final_acc"] for r in groups[k]])))
    lt = task == "fmnist-lt"
    head = "| policy | r | seeds | accuracy % |"
    sep = "|---|---|---|---|"
    if lt:
        head += " balanced % | head % | tail % |"
        sep += "---|---|---|"
    head += " samples / N E | samples / N_dedup E |"
    head += " served: dup rows % | mislabelled % | tail % | distinct covered % |"
    sep += "---|---|---|---|---|---|"
    lines = [head, sep]
    for k in keys:
        runs = groups[k]
        reg = [r.get("regime", {}) for r in runs]

        def col(name: str, scale: float = 100.0, digits: int = 1, reg: list = reg) -> str:
            vals = [g[name] for g in reg if name in g]
            return _ms(vals, scale, digits) if vals else "-"

        cells = [k[1], f"{k[2]:g}", str(len(runs)), _ms([r["final_acc"] for r in runs])]
        if lt:
            cells += [col("balanced_acc", digits=2), col("head_acc"), col("tail_acc")]
        cells += [
            f"{np.mean([r['sample_fraction'] for r in runs]):.3f}",
            col("sample_fraction_dedup", 1.0, 3),
            col("served_dup_share"),
            col("served_noisy_share"),
            col("served_tail_share"),
            col("distinct_images_covered"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def metric_of(task: str) -> str:
    """The accuracy a task's target is judged on (balanced accuracy for the long tail)."""
    return "balanced_acc" if task == "fmnist-lt" else "final_acc"


def _value(r: dict[str, Any], metric: str) -> float:
    return float(r["final_acc"] if metric == "final_acc" else r["regime"][metric])


def target_check(task: str, groups: dict[tuple[str, str, float], list[dict]]) -> list[str]:
    """Per ratio: best saelect row against the best baseline, paired over common seeds."""
    metric = metric_of(task)
    lines = []
    ratios = sorted({k[2] for k in groups if k[0] == task and k[2] < 1.0})
    for ratio in ratios:
        rows = {k[1]: groups[k] for k in groups if k[0] == task and k[2] == ratio}

        def mean(name: str, rows: dict = rows) -> float:
            return float(np.mean([_value(r, metric) for r in rows[name]]))

        ours = [n for n in rows if n.split("[")[0] in SAELECT]
        base = [n for n in rows if n in BASELINES]
        if not ours or not base or "rs2" not in rows or len(rows["rs2"]) < 2:
            continue
        best_ours = max(ours, key=mean)
        best_base = max(base, key=mean)
        # the noise floor: the larger seed std of `rs2` and of the best baseline
        floor = max(
            float(np.std([_value(r, metric) for r in rows[name]], ddof=1))
            for name in {"rs2", best_base}
            if len(rows[name]) > 1
        )
        a = {r["seed"]: _value(r, metric) for r in rows[best_ours]}
        b = {r["seed"]: _value(r, metric) for r in rows[best_base]}
        seeds = sorted(set(a) & set(b))
        diff = np.array([a[s] - b[s] for s in seeds])
        sd = float(diff.std(ddof=1)) if diff.size > 1 else float("nan")
        beats = diff.mean() > floor and diff.size >= 2
        verdict = "beats" if beats else ("ties" if abs(diff.mean()) <= floor else "loses to")
        lines.append(
            f"- r = {ratio:g} ({metric}): best saelect row `{best_ours}` "
            f"{100 * mean(best_ours):.2f}%, best baseline `{best_base}` "
            f"{100 * mean(best_base):.2f}%; paired difference over seeds {seeds}: "
            f"{100 * diff.mean():+.2f} ± {100 * sd:.2f} points; noise floor (larger seed std "
            f"of `rs2` ({len(rows['rs2'])} seeds) and `{best_base}` ({len(rows[best_base])})): "
            f"{100 * floor:.2f} points: **{verdict}**."
        )
    full = groups.get((task, "full", 1.0))
    if full:
        fm = float(np.mean([_value(r, metric) for r in full]))
        lines.append(f"- full data ({len(full)} seed(s)): {100 * fm:.2f}% ({metric}).")
    return lines


def http_lines(task: str, epochs: int, runs: list[dict], local: dict[str, dict]) -> list[str]:
    """One line per run of ``task`` served over HTTP, against the in-process run of its key."""
    out = []
    for r in sorted(runs, key=lambda r: r["key"]):
        if r["task"] != task or r["epochs"] != epochs:
            continue
        twin = local.get(r["key"])
        same = twin is not None and twin.get("served_digest") == r.get("served_digest")
        cmp = (
            f"in-process {100 * twin['final_acc']:.2f}%, served indices "
            f"{'identical' if same else 'different'}"
            if twin
            else "no in-process twin"
        )
        out.append(
            f"- over HTTP (`saelect serve`): `{row_name(r)}` r = {r['ratio']:g}, seed "
            f"{r['seed']}: {100 * r['final_acc']:.2f}% ({cmp})."
        )
    return out


def render(records: list[dict[str, Any]]) -> str:
    """The generated markdown block (without the markers); tables and targets from the
    in-process runs, HTTP runs as one line each against their in-process twin."""
    local_recs = [r for r in records if r.get("via", "inprocess") == "inprocess"]
    http = [r for r in records if r.get("kind") == "run" and r.get("via") == "http"]
    local = {r["key"]: r for r in local_recs if r.get("kind") == "run"}
    out: list[str] = []
    for epochs in sorted({r["epochs"] for r in local.values()}):
        groups = group_runs([r for r in local.values() if r["epochs"] == epochs])
        for task in sorted({k[0] for k in groups}):
            out += [f"#### Task `{task}` (in-process, E = {epochs})", ""]
            out += [*task_table(task, groups), ""]
            out += [*target_check(task, groups), *http_lines(task, epochs, http, local), ""]
    return "\n".join(out).rstrip() + "\n"


def write_doc(block: str, doc: Path = DOC) -> None:
    """Replace the marked block of ``doc`` (ValueError when the markers are missing)."""
    replace_marked(doc, BEGIN, END, block)


def main(argv: list[str] | None = None) -> int:
    """Print (or write) the regime tables of the given results files."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--write", action="store_true", help=f"replace the block in {DOC.name}")
    args = ap.parse_args(argv)
    records = [rec for path in args.results for rec in read_results(path)]
    block = render(records)
    if args.write:
        write_doc(block)
    else:
        print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
