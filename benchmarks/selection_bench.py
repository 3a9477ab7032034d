"""Per-epoch selection time of ``factor`` (N = 10M in <= 1 s on 2 cores for the literal form, the
defaults at most 1.5x that and <= 1.5 s; 1000 classes at N = 1.28M in <= 1 s; a constant number
of broadcasts per epoch whatever the number of classes).

Measures, on synthetic R and D in [0, 1] (r = 0.3, cosine schedule, additive penalty), four
forms of the policy (``--forms``):

* ``literal``: the paper's ranking (``sampling="topm"``, no quotas, no dynamic coverage);
* ``default``: the policy's defaults on data with R and D only (Gumbel sampling at tau = 1;
  quotas and dynamic coverage stay off without labels and codes);
* ``default+labels``: the defaults on data with C classes (class quotas: every class's top in
  one stage);
* ``default+labels+codes``: the defaults on data that also holds C classes and TopK codes
  (k = 32 of M = 2048 units): class quotas and dynamic coverage (one sparse matrix-vector
  product per epoch) switch on, as they do on a labelled dataset scored by the service;

for the single-process engine (one in-process shard, exact top m by a partition per class) at
N = 1e5, 1e6, 1e7 and 1e8 when memory allows (skipped above ~10 GiB or 60% of free memory) with
C = 10, plus ImageNet's shape (N = 1.28M, C = 1000, codes); and the histogram-threshold
protocol over 8 in-process shards at N = 1.28M for C = 10, 100, 1000 (broadcasts per epoch per
form; each broadcast is one Ray round trip over shard actors), checked to give exactly the
single-process epochs.

Each timed epoch is select + commit (scoring, top m, shuffle, stats, usage update). Writes
docs/benchmarks_selection.md and docs/figures/selection_time.png.

Usage: ``python benchmarks/selection_bench.py [--sizes 1e5,1e6,1e7,1e8] [--epochs 5]``
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from selection_measure import (  # noqa: E402
    CLASSES,
    FORMS,
    IMAGENET_CLASSES,
    IMAGENET_N,
    Row,
    available_bytes,
    bench_interleaved,
    bench_sharded,
    bench_single,
    synthetic_data,
)
from selection_pieces import bench_parts  # noqa: E402
from selection_report import plot, verdicts, write_doc  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1e5,1e6,1e7,1e8", help="comma-separated N values")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per size")
    parser.add_argument("--forms", default=",".join(FORMS), help=f"policy forms of {list(FORMS)}")
    parser.add_argument("--shards", type=int, default=8, help="shards of the protocol runs")
    parser.add_argument(
        "--protocol-classes", default="10,100,1000", help="class counts of the protocol runs"
    )
    parser.add_argument("--protocol-n", type=float, default=IMAGENET_N, help="N of those runs")
    parser.add_argument("--no-imagenet", action="store_true", help="skip the 1000-class row")
    parser.add_argument(
        "--parts-n", type=float, default=1e7, help="N of the per-piece timings (0: skip)"
    )
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks_selection.md"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    forms = [f for f in args.forms.split(",") if f]
    unknown = set(forms) - set(FORMS)
    if unknown:
        parser.error(f"unknown forms {sorted(unknown)}; known: {list(FORMS)}")
    limit = min(10 * 2**30, int(0.6 * available_bytes()) or 10 * 2**30)
    rows: list[Row] = []
    skipped: list[str] = []

    def report(row: Row) -> None:
        rows.append(row)
        calls = "" if row.broadcasts is None else f", {row.broadcasts:.1f} broadcasts/epoch"
        if row.label.startswith("interleaved"):
            calls = f", {row.broadcasts:.2f}x the literal form"
        print(
            f"{row.label} {row.form} C={row.classes} N={row.n:>11,}: median {row.median_s:.3f} "
            f"s, {row.ns_per_sample:.1f} ns/sample{calls}",
            flush=True,
        )

    for form, n in itertools.product(forms, sizes):
        need = n * FORMS[form][2]
        if need > limit:
            skipped.append(
                f"{form} at N = {n:,} (needs ~{need / 2**30:.1f} GiB, limit {limit / 2**30:.1f})"
            )
            print(f"skip {form} N={n:,}: ~{need / 2**30:.1f} GiB", flush=True)
            continue
        epochs = args.epochs if n <= 10**7 else min(args.epochs, 3)
        report(bench_single(synthetic_data(n, form), epochs, form, CLASSES)[0])
    both = {"literal", "default+labels+codes"} <= set(forms)
    if both and 10**7 in sizes and 10**7 * (80 + FORMS["default+labels+codes"][2]) <= limit:
        report(bench_interleaved(10**7, args.epochs))
    if not args.no_imagenet and "default+labels+codes" in forms:
        data = synthetic_data(IMAGENET_N, "default+labels+codes", classes=IMAGENET_CLASSES)
        report(bench_single(data, args.epochs, "default+labels+codes", IMAGENET_CLASSES)[0])
    n = int(args.protocol_n)
    classes_list = [int(c) for c in args.protocol_classes.split(",") if c]
    for form in forms:
        for classes in classes_list if FORMS[form][1] else classes_list[:1]:
            data = synthetic_data(n, form, classes=classes)
            expect = bench_single(data, args.epochs, form, classes)[1]
            report(bench_sharded(data, args.shards, args.epochs, form, classes, expect))
    parts = None
    if args.parts_n and args.parts_n * FORMS["default+labels+codes"][2] <= limit:
        parts = (int(args.parts_n), bench_parts(int(args.parts_n)))
        for name, sec in parts[1]:
            print(f"N={parts[0]:,} {name}: {sec:.3f}", flush=True)
    for v in verdicts(rows):
        print(v)
    plotted = not args.no_plot
    if plotted:
        plot(rows, ROOT / "docs" / "figures" / "selection_time.png")
    command = "python benchmarks/selection_bench.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    write_doc(rows, skipped, Path(args.doc), command.strip(), plotted, parts)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
