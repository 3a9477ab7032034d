"""Tables of the training benchmark, from its results JSONL, into docs/benchmarks_train.md.

    python benchmarks/train_report.py --results results/train.jsonl --doc docs/benchmarks_train.md

Everything between the markers ``<!-- BEGIN GENERATED -->`` and ``<!-- END GENERATED -->`` of the
doc is rewritten from the results file (tables as mean ± std over seeds, target checks, timing,
diagnostics); the prose outside the markers (regime, reading) is kept. A doc that does not exist
yet is created with the generated part only.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.train_runs import read_results

BEGIN = "<!-- BEGIN GENERATED -->"
END = "<!-- END GENERATED -->"
REPO = Path(__file__).resolve().parents[1]
POLICY_ORDER = (
    "full",
    "factor",
    "factor_gumbel",
    "rs2",
    "full_fewer",
    "static_random",
    "infobatch",
    "infobatch_max",
    "ucb",
    "epsilon_greedy",
)
TARGET_RATIOS = (0.1, 0.2, 0.3)
TARGET_GAP = 0.002  # 0.2 points of accuracy
TARGET_ROWS = ("factor[service_default]", "factor[qd_gumbel1]", "factor")
"""Rows the targets are checked on (first recorded wins): the defaults, else the literal form."""


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def fmt_acc(xs: Sequence[float]) -> str:
    """``mean ± std (n)`` in percent with 2 decimals; std over seeds (ddof 1)."""
    if not xs:
        return ""
    m, s = _mean_std(xs)
    return f"{100 * m:.2f} ± {100 * s:.2f} ({len(xs)})"


def runs_of(
    records: Iterable[dict[str, Any]], task: str, via: str | None = None
) -> list[dict[str, Any]]:
    """The run records of ``task`` (of one path when ``via`` is given; last record of a key
    wins)."""
    by_key: dict[str, dict[str, Any]] = {}
    for r in records:
        same_path = via is None or r.get("via") == via
        if r.get("kind") == "run" and r.get("task") == task and same_path:
            by_key[r["key"]] = r
    return list(by_key.values())


def sections(records: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """(task, via) pairs in order of first appearance, HTTP before in-process per task.

    Each path gets its own tables: their scores can differ (the service's SAE is trained in
    another process), so the comparisons are made within one path.
    """
    seen: list[tuple[str, str]] = []
    for r in records:
        if r.get("kind") == "run" and (r["task"], str(r.get("via"))) not in seen:
            seen.append((r["task"], str(r.get("via"))))
    order = {t: i for i, t in enumerate(dict.fromkeys(t for t, _ in seen))}
    return sorted(seen, key=lambda tv: (order[tv[0]], tv[1] != "http"))


def row_name(r: dict[str, Any]) -> str:
    """Table row of a run: the policy, with its variant for factor policies."""
    if r["policy"] in ("factor", "factor_gumbel") and r.get("variant", "default") != "default":
        return f"{r['policy']}[{r['variant']}]"
    return r["policy"]


def group(
    runs: Iterable[dict[str, Any]], metric: str = "final_acc"
) -> dict[tuple[str, float], list[float]]:
    """(row name, ratio) -> the metric over seeds."""
    out: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in runs:
        out[(row_name(r), float(r["ratio"]))].append(float(r[metric]))
    return out


def _row_sort_key(name: str) -> tuple[int, str]:
    base = name.split("[", 1)[0]
    rank = POLICY_ORDER.index(base) if base in POLICY_ORDER else len(POLICY_ORDER)
    return (rank, name)


def accuracy_table(runs: list[dict[str, Any]], metric: str = "final_acc") -> list[str]:
    """Markdown rows: one per policy (variant), one column per ratio; full has its own column."""
    g = group(runs, metric)
    ratios = sorted({ratio for (_, ratio) in g if ratio < 1.0})
    names = sorted({name for (name, _) in g}, key=_row_sort_key)
    head = "| policy | " + " | ".join(f"r = {r:g}" for r in ratios) + " | r = 1 or own budget |"
    lines = [head, "|" + "---|" * (len(ratios) + 2)]
    for name in names:
        cells = [fmt_acc(g.get((name, r), [])) for r in ratios]
        cells.append(fmt_acc(g.get((name, 1.0), [])))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def fraction_table(runs: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: realized samples processed (share of N E) and mean train time per cell."""
    frac = group(runs, "sample_fraction")
    train = group(runs, "train_s")
    sel = group(runs, "select_s")
    ratios = sorted({ratio for (_, ratio) in frac})
    names = sorted({name for (name, _) in frac}, key=_row_sort_key)
    lines = [
        "| policy | " + " | ".join(f"r = {r:g}" for r in ratios) + " |",
        "|" + "---|" * (len(ratios) + 1),
    ]
    for name in names:
        cells = []
        for r in ratios:
            if (name, r) not in frac:
                cells.append("")
                continue
            f = np.mean(frac[(name, r)])
            t = np.mean(train[(name, r)])
            s = np.mean(sel[(name, r)])
            cells.append(f"{f:.3f} · {t:.0f} s · {1000 * s:.0f} ms")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _interval(xs: Sequence[float]) -> tuple[float, float]:
    m, s = _mean_std(xs)
    return m - s, m + s


def target_checks(runs: list[dict[str, Any]]) -> list[str]:
    """The targets of docs/benchmarks.md, Targets (issue 5), checked on the recorded runs."""
    g = group(runs)
    frac = group(runs, "sample_fraction")
    out: list[str] = []
    full = g.get(("full", 1.0))
    if not full:
        return ["- no `full` runs recorded yet: targets not checkable."]
    full_mean = _mean_std(full)[0]
    for r in TARGET_RATIOS:
        # the targets are about factor's current default; the literal form where it did not run
        name = next((n for n in TARGET_ROWS if g.get((n, r))), None)
        if name is None:
            continue
        fac = g[(name, r)]
        m = _mean_std(fac)[0]
        ok = m >= full_mean - TARGET_GAP
        out.append(
            f"- r = {r:g}: {name} {100 * m:.2f}% vs full {100 * full_mean:.2f}% "
            f"(gap {100 * (full_mean - m):+.2f} points; target <= 0.20): "
            f"{'met' if ok else 'not met'}"
        )
        lo, _ = _interval(fac)
        for base in ("rs2", "full_fewer", "infobatch", "infobatch_max"):
            own = base.startswith("infobatch")  # own budget: recorded at r = 1
            other = g.get((base, 1.0 if own else r))
            if not other:
                continue
            budget = ""
            if own:
                budget = f" at its own budget {np.mean(frac[(base, 1.0)]):.2f} of the samples"
            om = _mean_std(other)[0]
            _, ohi = _interval(other)
            verdict = (
                "better, spreads apart"
                if lo > ohi
                else "better, spreads overlap"
                if m > om
                else "not better"
            )
            out.append(
                f"  - vs {base}{budget}: {100 * (m - om):+.2f} points ({verdict}; "
                f"n = {len(fac)} vs {len(other)})"
            )
    rs2 = g.get(("rs2", 0.5))
    fewer = g.get(("full_fewer", 0.5))
    if rs2 and fewer:
        gap = _mean_std(rs2)[0] - _mean_std(fewer)[0]
        out.append(
            f"- noise floor (rs2 r = 0.5 vs full data for E/2 epochs, the same procedure in "
            f"distribution): {100 * gap:+.2f} points; seed std {100 * _mean_std(rs2)[1]:.2f} "
            f"and {100 * _mean_std(fewer)[1]:.2f}"
        )
    return out


def ablation_table(runs: list[dict[str, Any]]) -> list[str]:
    """factor variants at every ratio they ran, with the difference to ``default``."""
    fac = [r for r in runs if r["policy"] == "factor"]
    variants = sorted({r.get("variant", "default") for r in fac})
    if len(variants) < 2:
        return []
    by: dict[tuple[str, float], list[float]] = defaultdict(list)
    frac: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in fac:
        by[(r.get("variant", "default"), float(r["ratio"]))].append(float(r["final_acc"]))
        frac[(r.get("variant", "default"), float(r["ratio"]))].append(float(r["sample_fraction"]))
    ratios = sorted({ratio for (v, ratio) in by if v != "default"})
    lines = [
        "| variant | " + " | ".join(f"r = {r:g} (Δ vs default)" for r in ratios) + " |",
        "|" + "---|" * (len(ratios) + 1),
    ]
    for v in variants:
        cells = []
        for r in ratios:
            xs = by.get((v, r), [])
            base = by.get(("default", r), [])
            if not xs:
                cells.append("")
                continue
            d = f" ({100 * (np.mean(xs) - np.mean(base)):+.2f})" if base and v != "default" else ""
            f = float(np.mean(frac[(v, r)]))
            budget = f" [samples {f:.2f}]" if abs(f - r) > 0.005 else ""
            cells.append(fmt_acc(xs) + d + budget)
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def _tv(shares: Sequence[float], ref: Sequence[float]) -> float:
    a, b = np.asarray(shares), np.asarray(ref)
    return 0.5 * float(np.abs(a - b).sum())


def diagnostics_table(runs: list[dict[str, Any]], scoring: dict[str, dict[str, Any]]) -> list[str]:
    """Per factor/rs2 (row, ratio): R-D rank correlation, class imbalance, penalty share,
    final coverage and usage spread (means over seeds)."""
    rows: dict[tuple[str, float], list[dict[str, float]]] = defaultdict(list)
    for r in runs:
        diag = r.get("diagnostics")
        if not diag or not diag.get("epochs"):
            continue
        eps = diag["epochs"]
        ref = r.get("class_prior")
        shares = [e["class_share"] for e in eps]
        if ref is None:
            k = len(shares[0])
            ref = [1.0 / k] * k
        tv = [_tv(s, ref) for s in shares]
        pens = [e["penalty_share"] for e in eps[1:] if e.get("penalty_share") is not None]
        sc = scoring.get(r.get("scoring_key") or "", {})
        rows[(row_name(r), float(r["ratio"]))].append(
            {
                "rho": sc.get("spearman_RD", float("nan")),
                "tv_first": tv[0],
                "tv_max": max(tv),
                "penalty": float(np.mean(pens)) if pens else float("nan"),
                "coverage": eps[-1]["coverage"],
                "usage_std": eps[-1]["usage_std"],
            }
        )
    if not rows:
        return []
    lines = [
        "| run | r | Spearman(R, D) | class TV epoch 0 | class TV max | penalty share "
        "| coverage at end | usage std at end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (name, ratio), items in sorted(
        rows.items(), key=lambda x: (x[0][1], _row_sort_key(x[0][0]))
    ):

        def avg(k: str, items: list[dict[str, float]] = items) -> str:
            vals = [i[k] for i in items if not math.isnan(i[k])]
            return f"{np.mean(vals):.3f}" if vals else "n/a"

        lines.append(
            f"| {name} | {ratio:g} | {avg('rho')} | {avg('tv_first')} | {avg('tv_max')} | "
            f"{avg('penalty')} | {avg('coverage')} | {avg('usage_std')} |"
        )
    return lines


def timing_lines(runs: list[dict[str, Any]], scoring: dict[str, dict[str, Any]]) -> list[str]:
    """End-to-end wall clock per (row, ratio) against full data, and the scoring cost."""
    out: list[str] = []
    full = [r["train_s"] + r["select_s"] for r in runs if r["policy"] == "full"]
    for key, sc in sorted(scoring.items()):
        out.append(
            f"- scoring `{key}` ({sc.get('feature', {}).get('kind')}, SAE {sc.get('sae')}, "
            f"via {sc.get('via')}): {sc.get('scoring_s', float('nan')):.1f} s one-time"
            + (
                f"; Spearman(R, D) = {sc['spearman_RD']:.3f}; dead units {sc['dead_share']:.3f}"
                if "spearman_RD" in sc
                else ""
            )
        )
    if not full:
        return out
    full_s = float(np.mean(full))
    g: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r["policy"] != "full":
            g[(row_name(r), float(r["ratio"]))].append(r)
    out.append(f"- full data: {full_s:.1f} s training + selection per run (mean)")
    for (name, ratio), items in sorted(g.items(), key=lambda x: (x[0][1], _row_sort_key(x[0][0]))):
        tr = float(np.mean([i["train_s"] + i["select_s"] for i in items]))
        sel = float(np.mean([i["select_s"] for i in items]))
        share = sel / max(tr - sel, 1e-9)
        sk = items[0].get("scoring_key")
        score_s = scoring.get(sk or "", {}).get("scoring_s", 0.0) if sk else 0.0
        out.append(
            f"- {name} r = {ratio:g}: {tr:.1f} s ({full_s / tr:.2f}x faster than full; "
            f"1/r = {1 / ratio:.1f}); with one-time scoring {tr + score_s:.1f} s "
            f"({full_s / (tr + score_s):.2f}x); selection + serving {100 * share:.2f}% "
            f"of training time"
        )
    return out


def equivalence_lines(records: Iterable[dict[str, Any]]) -> list[str]:
    """Runs recorded both via HTTP and in-process: same accuracy curves, same served indices?"""
    by: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        if r.get("kind") == "run":
            by[r["key"]][str(r.get("via"))] = r
    pairs = [(v["http"], v["inprocess"]) for v in by.values() if {"http", "inprocess"} <= set(v)]
    if not pairs:
        return []
    same_acc = [a["acc_curve"] == b["acc_curve"] for a, b in pairs]
    digested = [(a, b) for a, b in pairs if a.get("served_digest") and b.get("served_digest")]
    same_idx = sum(a["served_digest"] == b["served_digest"] for a, b in digested)
    differ = sorted(
        {
            f"{a['policy']} ({a['task']})"
            for (a, _), ok in zip(pairs, same_acc, strict=True)
            if not ok
        }
    )
    line = (
        f"- {len(pairs)} runs were recorded by both paths: {sum(same_acc)} had identical accuracy "
        f"curves; of the {len(digested)} with index digests on both sides, {same_idx} served "
        "identical indices in every epoch"
    )
    if differ:
        line += f"; results differ for {', '.join(differ)}"
    return [line]


def env_lines(records: Iterable[dict[str, Any]]) -> list[str]:
    """The machines and commands the results came from (env records, deduplicated)."""
    seen: set[str] = set()
    out = []
    for r in records:
        if r.get("kind") != "env":
            continue
        line = (
            f"- `{r.get('machine')}`, {r.get('cpus')} CPUs, {r.get('threads')} torch threads, "
            f"torch {r.get('torch')}, via {r.get('via')}: "
            f"`python benchmarks/train_bench.py {' '.join(r.get('argv', []))}`"
        )
        if line not in seen:
            seen.add(line)
            out.append(line)
    return out


def render(records: list[dict[str, Any]], *, results_name: str = "results/train.jsonl") -> str:
    """The generated part of the doc (markdown, without the markers)."""
    scoring = {r["key"].split("|", 1)[1]: r for r in records if r.get("kind") == "scoring"}
    lines = [
        f"_Generated by `python benchmarks/train_report.py` from `{results_name}` "
        f"({sum(1 for r in records if r.get('kind') == 'run')} run records)._",
        "",
        "Runs came from these machines and commands:",
        "",
        *env_lines(records),
        "",
    ]
    eq = equivalence_lines(records)
    if eq:
        lines += ["HTTP service against the in-process engine:", "", *eq, ""]
    for task, via in sections(records):
        runs = runs_of(records, task, via)
        epochs = sorted({int(r["epochs"]) for r in runs})
        lines += [
            f"### Task `{task}`, indices via {via} (E = {', '.join(map(str, epochs))})",
            "",
            "Final test accuracy (%), mean ± std over seeds (number of seeds):",
            "",
            *accuracy_table(runs),
            "",
            "Best test accuracy over epochs (%):",
            "",
            *accuracy_table(runs, "best_acc"),
            "",
            "Samples processed (share of N·E) · training time · selection + serving time, "
            "means per run:",
            "",
            *fraction_table(runs),
            "",
            "Targets:",
            "",
            *target_checks(runs),
            "",
        ]
        abl = ablation_table(runs)
        if abl:
            lines += ["Ablation and options of `factor`:", "", *abl, ""]
        diag = diagnostics_table(runs, scoring)
        if diag:
            lines += [
                "Diagnostics (class TV: total variation distance of the epoch's class shares "
                "from the training set's; penalty share: |penalty| / (|B| + |penalty|) over "
                "the selection, epochs >= 1; usage std: spread of per-sample selection counts "
                "after the last epoch):",
                "",
                *diag,
                "",
            ]
        lines += ["Wall clock:", "", *timing_lines(runs, scoring), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_doc(doc: Path, generated: str) -> None:
    """Replace the generated block of ``doc`` (create the doc when missing)."""
    block = f"{BEGIN}\n{generated}{END}\n"
    if doc.exists():
        text = doc.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            tail = rest.split(END, 1)[1].lstrip("\n")
            text = head + block + ("\n" + tail if tail else "")
        else:
            text = text.rstrip("\n") + "\n\n" + block
    else:
        text = "# Training benchmark\n\n" + block
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_suffix(doc.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(doc)


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the doc's tables from the results file."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--results",
        type=Path,
        nargs="+",
        default=[REPO / "results" / "train.jsonl"],
        help="one or more JSONL files; for a run key in several, the later file wins",
    )
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks_train.md")
    args = ap.parse_args(argv)
    records = [rec for path in args.results for rec in read_results(path)]
    if not records:
        raise SystemExit(f"no records in {args.results}")
    names = []
    for path in args.results:
        try:
            names.append(str(path.resolve().relative_to(REPO)))
        except ValueError:
            names.append(str(path))
    write_doc(args.doc, render(records, results_name="`, `".join(names)))
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
