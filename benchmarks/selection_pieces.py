"""The selection benchmark's per-piece timings: what one epoch of the defaults adds over the
literal form (Gumbel noise, per-class top m, coverage weights, covered units, the shuffle), and
the share of coverage weights that change per epoch.

Used by benchmarks/selection_bench.py; kept apart so that the runner stays short.
"""

from __future__ import annotations

import time

import numpy as np
from saelect.service.selection.engine import SingleProcessSelector
from saelect.service.selection.hashing import gumbel_range
from saelect.service.selection.shuffle import epoch_permutation
from saelect.service.selection.topk import grouped_top_m, top_m
from selection_measure import CLASSES, RATIO, UNITS, K, policy, synthetic_data

PIECE_TOP = "top m of N scores (literal form)"
PIECE_CLASSES = "top m per class, {} classes (on the thread pool)"
PIECE_GUMBEL = "Gumbel noise for N samples (blocked)"
PIECE_WEIGHTS = "coverage weights (sparse product over all N rows, k = {})"
PIECE_UNITS = "covered units of the epoch's selection (its m rows only)"


def bench_parts(n: int, classes: int = CLASSES, repeats: int = 3) -> list[tuple[str, float]]:
    """Seconds (best of ``repeats``) of the pieces one epoch of the defaults adds over the
    literal form, on N samples with codes: the Gumbel noise, the per-class top m against one
    top m, the coverage weights (sparse product) and the covered units of a selection."""
    data = synthetic_data(n, "default+labels+codes", classes=classes)
    rng = np.random.default_rng(5)
    scores = rng.random(n)
    m = int(RATIO * n)
    g = rng.random(UNITS).astype(np.float32)
    rows = np.sort(rng.choice(n, m, replace=False))
    layout = data.derived.label_layout()
    counts = data.derived.class_counts()
    quotas = [int(RATIO * c) for c in counts]

    def tiebreak(p: np.ndarray) -> np.ndarray:
        return p.astype(np.uint64)

    def best(fn) -> float:
        out = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
        return min(out)

    data.derived.profile_dot(g)  # build the sparse matrix outside the timing
    data.derived.unit_counts(rows)
    parts = [
        (PIECE_TOP, best(lambda: top_m(scores, tiebreak, m))),
        (
            PIECE_CLASSES.format(classes),
            best(lambda: grouped_top_m(scores, tiebreak, layout, quotas)),
        ),
        (PIECE_GUMBEL, best(lambda: gumbel_range(0, 1, 2, 0, n))),
        (
            PIECE_WEIGHTS.format(K),
            best(lambda: data.derived.profile_dot(g + np.float32(rng.random()))),
        ),
        (PIECE_UNITS, best(lambda: data.derived.unit_counts(rows.copy()))),
        (
            "epoch shuffle of m indices (overlaps the epoch on the pool)",
            best(lambda: epoch_permutation(m, 0, 1)),
        ),
    ]
    parts.append(("share of units whose coverage weight changes per epoch", changed_units()))
    return parts


def changed_units(n: int = 200_000, epochs: int = 6) -> float:
    """Mean share of the M coverage weights g_j that change from one epoch to the next in a run
    of the defaults (what an incremental update of the weights would have to touch)."""
    data = synthetic_data(n, "default+labels+codes")
    sel = SingleProcessSelector(policy(epochs, "default+labels+codes"), data)
    assert data.p is not None
    prev, shares = None, []
    for _ in range(epochs):
        sel.step()
        state = sel.policy.state_dict()
        g = 1.0 / (1.0 + state["coverage"] / (data.p * state["selected_total"]))
        if prev is not None:
            shares.append(float(np.mean(g != prev)))
        prev = g
    return float(np.mean(shares))
