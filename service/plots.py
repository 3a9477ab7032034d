"""The per-epoch figure of a selection: what `saelect simulate` draws for a simulated run and
`saelect jobs plot` for a live job, from the same per-epoch stats (the engine's, or the stats
route's, which are the engine's).

Three panels: the schedule lambda(t) with the mean R and D of each epoch's selection; coverage
(share of samples selected at least once) with the usage spread (max - min selections per
sample); and each class's share of every epoch (when the data has labels). The PNG carries the
figure's title and the panel titles in its text metadata (``Title``, ``Description``), so a
reader (or a test) can tell what an image shows without rendering it.

Example:
    >>> stats = [{"epoch": 0, "lambda": 0.0, "size": 3, "coverage": 0.5,
    ...           "usage": {"min": 0, "max": 1, "mean": 0.5}, "class_counts": [2, 1]}]
    >>> save_epoch_plot(stats, Path("epochs.png"), "demo")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

AXES_TITLES = (
    "schedule and what it selects",
    "coverage and usage spread",
    "class share per epoch",
)
"""Titles of the three panels, left to right."""


def epoch_figure(stats: Sequence[Mapping[str, Any]], title: str) -> Any:
    """The matplotlib Figure of ``stats`` (one dict per epoch, in epoch order).

    Parameters
    ----------
    stats:
        Per-epoch stats: ``epoch``, ``size``, ``coverage``, ``usage {min, max}``, and where
        present ``lambda``, ``mean_R``, ``mean_D`` (``factor``) and ``class_counts`` (labels).
    title:
        The figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [int(s["epoch"]) for s in stats]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    nan = float("nan")
    a.plot(t, [s.get("lambda") or 0.0 for s in stats], "k--", label="lambda(t)")
    a.plot(t, [_num(s.get("mean_R"), nan) for s in stats], label="mean R of selection")
    a.plot(t, [_num(s.get("mean_D"), nan) for s in stats], label="mean D of selection")
    a.set_xlabel("epoch")
    a.set_ylim(-0.02, 1.02)
    a.legend()
    b.plot(t, [_num(s.get("coverage"), nan) for s in stats], label="coverage (seen at least once)")
    spread = [s["usage"]["max"] - s["usage"]["min"] if s.get("usage") else nan for s in stats]
    b2 = b.twinx()
    b2.plot(t, spread, color="tab:red", label="usage max - min")
    b.set_xlabel("epoch")
    b.set_ylabel("coverage")
    b2.set_ylabel("usage spread", color="tab:red")
    b.legend(loc="lower right")
    _class_shares(c, t, stats)
    for ax, name in zip((a, b, c), AXES_TITLES, strict=True):
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_epoch_plot(stats: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Draw `epoch_figure` into the PNG ``path`` (its directory created); returns the path."""
    import matplotlib.pyplot as plt

    fig = epoch_figure(stats, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    panels = "; ".join(ax.get_title() for ax in fig.axes if ax.get_title())
    fig.savefig(path, dpi=110, metadata={"Title": title, "Description": panels})
    plt.close(fig)
    return path


def _class_shares(ax: Any, t: list[int], stats: Sequence[Mapping[str, Any]]) -> None:
    """Stacked bars: each class's share of every epoch (a note when there are no labels)."""
    counts = [s.get("class_counts") for s in stats]
    if not counts or any(c is None for c in counts):
        ax.text(0.5, 0.5, "no label column", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("epoch")
        return
    shares = np.asarray(counts, dtype=np.float64)  # (T, C)
    shares /= np.maximum(shares.sum(axis=1, keepdims=True), 1.0)
    bottom = np.zeros(len(t))
    for cls in range(shares.shape[1]):
        ax.bar(t, shares[:, cls], bottom=bottom, width=0.8, label=str(cls))
        bottom += shares[:, cls]
    ax.set_xlabel("epoch")
    ax.set_ylabel("share of the epoch")
    ax.set_ylim(0.0, 1.0)
    if shares.shape[1] <= 10:
        ax.legend(title="class", fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))


def _num(value: Any, default: float) -> float:
    return default if value is None else float(value)
