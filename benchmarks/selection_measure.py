"""The selection benchmark's measurement: the policy forms, synthetic data, and the engines timed
(the single process, the histogram-threshold protocol over in-process shards, and the literal
form interleaved with the defaults).

Used by benchmarks/selection_bench.py; kept apart so that the runner stays short.
"""

from __future__ import annotations

import functools
import itertools
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from saelect.service.policies import PolicyConfig, make_policy
from saelect.service.selection.engine import EpochResult, SelectionEngine, SingleProcessSelector
from saelect.service.selection.threshold import local_broadcast
from saelect.workers.selection_shard import SelectionShard
from saelect.workers.shard_data import ShardData

RATIO = 0.3
CLASSES, UNITS, K = 10, 2048, 32  # synthetic labels and codes
IMAGENET_N, IMAGENET_CLASSES = 1_281_167, 1000
FORMS: dict[str, tuple[dict, str, int]] = {
    # form -> (factor params, what the data holds besides R and D, bytes per sample at peak)
    "literal": ({"sampling": "topm", "class_quotas": False, "dynamic_coverage": False}, "", 80),
    "default": ({}, "", 96),
    "default+labels": ({}, "labels", 112),
    # + int32/float16 codes (6 k B), the float32 activations and 0/1 matrix (8 k B), temporaries
    "default+labels+codes": ({}, "labels+codes", 160 + 16 * K),
}


@dataclass
class Row:
    """One measured configuration."""

    label: str
    form: str
    classes: int | None
    n: int
    shards: int
    epochs: int
    median_s: float
    min_s: float
    broadcasts: float | None  # per epoch (select + commit); None for the in-process shard
    cpu_s: float | None = None  # median process CPU seconds per epoch (all threads)
    cpu_ratio: float | None = None  # interleaved rows: median CPU-time ratio to the literal form

    @property
    def ns_per_sample(self) -> float:
        return 1e9 * self.median_s / self.n


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@functools.lru_cache(maxsize=3)
def _arrays(n: int, seed: int, classes: int, codes: bool) -> tuple[np.ndarray, ...]:
    """(R, D, labels[, ids, vals, p]) of :func:`synthetic_data`, drawn once per size (the
    forms share them; every form's ShardData is a fresh object with its own derived
    structures)."""
    rng = np.random.default_rng(seed)
    R, D = rng.random(n), rng.random(n)
    rng = np.random.default_rng(seed + 1)
    labels = rng.integers(0, classes, size=n, dtype=np.int64)
    if not codes:
        return R, D, labels
    # K distinct units per sample: K strided draws from a random offset (as TopK gives)
    offset = rng.integers(0, UNITS, size=(n, 1), dtype=np.int32)
    step = rng.integers(1, UNITS // K, size=(n, 1), dtype=np.int32)
    ids = (offset + step * np.arange(K, dtype=np.int32)) % UNITS
    vals = (1.0 - rng.random((n, K), dtype=np.float32)).astype(np.float16)
    p = np.bincount(ids.ravel(), minlength=UNITS) / float(n)
    return R, D, labels, ids, vals, p


def synthetic_data(n: int, form: str, seed: int = 0, classes: int = CLASSES) -> ShardData:
    """ShardData [0, n) with R, D uniform in [0, 1] and, as the form holds them, int64 (n,)
    labels in [0, classes), int32 (n, K) distinct unit ids in [0, UNITS), float16 (n, K)
    values in (0, 1] and float64 (UNITS,) unit frequencies p."""
    holds = FORMS[form][1]
    if holds != "labels+codes":
        R, D, labels = _arrays(n, seed, classes, False)
        return ShardData(0, n, R=R, D=D, labels=labels if holds else None)
    R, D, labels, ids, vals, p = _arrays(n, seed, classes, True)
    return ShardData(0, n, R=R, D=D, labels=labels, code_ids=ids, code_values=vals, p=p)


def split(data: ShardData, shards: int) -> list[ShardData]:
    """``shards`` contiguous views of ``data``."""
    bounds = np.linspace(0, data.n, shards + 1).astype(np.int64)

    def part(arr: np.ndarray | None, a: int, b: int) -> np.ndarray | None:
        return None if arr is None else arr[a:b]

    return [
        ShardData(
            int(a),
            int(b),
            R=part(data.R, a, b),
            D=part(data.D, a, b),
            labels=part(data.labels, a, b),
            code_ids=part(data.code_ids, a, b),
            code_values=part(data.code_values, a, b),
            p=data.p,
        )
        for a, b in itertools.pairwise(bounds)
    ]


def time_epochs(
    engine: SelectionEngine, epochs: int
) -> tuple[list[float], list[EpochResult], float, list[float]]:
    """Wall seconds of select + commit per epoch, the results, broadcasts per epoch, and the
    process CPU seconds per epoch (all threads: what an idle machine would need at most on one
    core; other processes cannot inflate it)."""
    times, results, cpu = [], [], []
    for t in range(epochs):
        start, cpu0 = time.perf_counter(), time.process_time()
        r = engine.select(t)
        engine.commit(t)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu0)
        results.append(r)
    return times, results, engine.broadcasts / epochs, cpu


def policy(epochs: int, form: str = "default"):
    return make_policy(PolicyConfig("factor", RATIO, epochs, seed=0, params=FORMS[form][0]))


def classes_of(form: str, classes: int) -> int | None:
    return classes if FORMS[form][1] else None


def bench_single(
    data: ShardData, epochs: int, form: str, classes: int
) -> tuple[Row, list[EpochResult]]:
    sel = SingleProcessSelector(policy(epochs, form), data)
    times, results, _, cpu = time_epochs(sel, epochs)
    row = Row(
        "single process",
        form,
        classes_of(form, classes),
        data.n,
        1,
        epochs,
        statistics.median(times),
        min(times),
        None,
        statistics.median(cpu[1:] or cpu),  # epoch 0 builds the derived structures
    )
    return row, results


def bench_sharded(
    data: ShardData, shards: int, epochs: int, form: str, classes: int, expect: list[EpochResult]
) -> Row:
    pol = policy(epochs, form)
    parts = [SelectionShard(d, pol) for d in split(data, shards)]
    engine = SelectionEngine(pol, local_broadcast(parts))
    times, results, calls, cpu = time_epochs(engine, epochs)
    for x, y in zip(results, expect, strict=True):
        if not np.array_equal(x.indices, y.indices):
            raise AssertionError(f"sharded epoch {x.epoch} ({form}) differs from single process")
    label = f"threshold protocol, {shards} shards"
    return Row(
        label,
        form,
        classes_of(form, classes),
        data.n,
        shards,
        epochs,
        statistics.median(times),
        min(times),
        calls,
        statistics.median(cpu[1:] or cpu),
    )


def bench_interleaved(n: int, epochs: int) -> Row:
    """The literal form and the defaults (10 classes, codes) on N samples, their epochs run
    alternately, so a change in the machine's load hits both alike; a Row whose median is the
    defaults' and whose ``broadcasts`` field holds the median ratio defaults / literal."""
    lit = SingleProcessSelector(policy(epochs, "literal"), synthetic_data(n, "literal"))
    full_form = "default+labels+codes"
    full = SingleProcessSelector(policy(epochs, full_form), synthetic_data(n, full_form))
    pairs, cpu = [], []
    for _ in range(epochs):
        one, one_cpu = [], []
        for sel in (lit, full):
            start, cpu0 = time.perf_counter(), time.process_time()
            sel.step()
            one.append(time.perf_counter() - start)
            one_cpu.append(time.process_time() - cpu0)
        pairs.append(one)
        cpu.append(one_cpu)
    ratio = statistics.median(b / a for a, b in pairs[1:] or pairs)  # epoch 0 builds structures
    times = [b for _, b in pairs[1:] or pairs]
    cpu_ratio = statistics.median(b / a for a, b in cpu[1:] or cpu)
    print(f"interleaved: CPU-time ratio defaults / literal {cpu_ratio:.2f}", flush=True)
    return Row(
        "interleaved with the literal form",
        full_form,
        CLASSES,
        n,
        1,
        epochs,
        statistics.median(times),
        min(times),
        ratio,
        statistics.median(b for _, b in cpu[1:] or cpu),
        cpu_ratio,
    )
