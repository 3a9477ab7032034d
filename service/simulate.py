"""`saelect simulate`: preview a policy's epochs without training (no Ray, no HTTP).

Scores a dataset in this process (features, SAE, R and D: the same pure functions as the Ray
pipeline), runs the policy's selection for every epoch, prints per-epoch lambda, coverage, usage
spread and the mean R and D of the selection, and writes a PNG of them with each class's share
of every epoch (`service.plots`: the figure `saelect jobs plot` draws of a live job). Useful to see
what a config does (the schedule's sweep from R to D, how fast coverage grows, whether the usage
penalty turns selection into round-robin) before spending a training run on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from saelect.service.policies import PolicyConfig, make_policy
from saelect.service.selection.engine import SingleProcessSelector
from saelect.workers.features import FeatureSpec
from saelect.workers.sae import SAEConfig
from saelect.workers.scores import ScoreConfig


@dataclass(frozen=True)
class SimulationResult:
    """Per-epoch statistics of a simulated run."""

    stats: list[dict[str, Any]]
    """The engine's stats dict of every epoch (lambda, size, coverage, usage, mean_R, ...)."""
    rd_spearman: float
    """Rank correlation of R and D over the dataset (near -1: D is reversed R)."""
    timings: dict[str, float]
    """Scoring seconds per phase."""


def simulate(
    dataset_uri: str,
    policy: PolicyConfig,
    *,
    feature: FeatureSpec,
    label_column: str | None = "label",
    sae: SAEConfig | None = None,
    scores: ScoreConfig | None = None,
) -> SimulationResult:
    """Score ``dataset_uri`` in-process and run ``policy`` over all its epochs.

    Loss-based policies get no feedback here (their epochs then follow their no-loss fallback).
    """
    from saelect.workers.scoring_local import score_single_process

    sc = score_single_process(
        dataset_uri, feature, label_column, sae or SAEConfig(), scores or ScoreConfig()
    )
    data = sc.shard_data()
    engine = SingleProcessSelector(make_policy(policy), data)
    stats = [engine.step().stats for _ in range(policy.epochs)]
    rho = float(np.corrcoef(sc.R, sc.D)[0, 1])  # R, D are ranks already: Pearson = Spearman
    return SimulationResult(stats=stats, rd_spearman=rho, timings=dict(sc.timings))


def plot_simulation(result: SimulationResult, path: Path, title: str) -> None:
    """The per-epoch figure of `service.plots` (schedule, coverage and usage, class shares)."""
    from saelect.service.plots import save_epoch_plot

    save_epoch_plot(result.stats, path, title)


def print_simulation(result: SimulationResult) -> None:
    """One line per epoch."""
    print(f"rank correlation of R and D: {result.rd_spearman:+.3f}")
    print(
        f"{'epoch':>5} {'lambda':>7} {'size':>7} {'coverage':>9} {'usage min/max':>14} "
        f"{'mean R':>7} {'mean D':>7}"
    )
    for s in result.stats:
        lam = s.get("lambda")
        print(
            f"{s['epoch']:>5} {lam if lam is not None else float('nan'):>7.3f} {s['size']:>7} "
            f"{s['coverage']:>9.3f} {s['usage']['min']:>6}/{s['usage']['max']:<7} "
            f"{s.get('mean_R', float('nan')):>7.3f} {s.get('mean_D', float('nan')):>7.3f}"
        )


def run_simulation_cli(args: Any) -> int:
    """Handler of `saelect simulate`."""
    policy = PolicyConfig(
        name=args.policy,
        ratio=args.ratio,
        epochs=args.epochs,
        seed=args.seed,
        params=json.loads(args.params) if args.params else {},
    )
    feature = FeatureSpec(kind=args.feature, column=args.column, dim=args.dim)
    sae = SAEConfig(units=args.units, k=args.k, epochs=args.sae_epochs, seed=args.seed)
    result = simulate(args.uri, policy, feature=feature, label_column=args.label, sae=sae)
    print_simulation(result)
    out = Path(args.plot)
    plot_simulation(result, out, f"{args.policy} r={args.ratio} on {Path(args.uri).name}")
    print(f"plot: {out.resolve()}")
    return 0
