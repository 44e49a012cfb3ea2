"""Paired significance between two scorings of the same items, from lm-eval's per-sample outputs.

Two runs (or two protocols) that scored the same documents differ per document, not only in
their means: the paired bootstrap interval of the difference and McNemar's exact test on the
discordant documents use that pairing, and are far sharper than comparing two intervals.

A column of several lm-eval tasks is scored as the mean of its tasks' means, so its difference
is bootstrapped per task (documents resampled within each task). With several seeds, McNemar's
test pools the discordant (document, seed) pairs, and the interval of the difference counts
both sources of its variance (`seeds_and_items_interval`): the seed-to-seed spread of the
per-seed differences and the documents' (docs/statistics.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hydrabench.errors import SpecError
from hydrabench.evaluation.harness import read_samples
from hydrabench.records.store import RunRecord, RunStore

# A document within one lm-eval task: its index and lm-eval's hash of its content.
ItemKey = tuple[int, str]

BOOTSTRAP_ITERATIONS = 10_000
SIGNIFICANCE_LEVEL = 0.05


@dataclass(frozen=True)
class PairedComparison:
    """A against B on the same items; scores and differences in percentage points."""

    n_items: int  # documents per seed, over every task compared
    n_seeds: int
    score_a: float
    score_b: float
    delta: float  # score_a - score_b
    ci_low: float  # 95% paired bootstrap interval of delta
    ci_high: float
    p_value: float | None  # McNemar's exact test; None when outcomes are not all 0 or 1
    a_only: int  # discordant pairs: A right and B wrong
    b_only: int  # and B right, A wrong
    # How the interval was made: "items" (paired bootstrap over documents, one seed) or
    # "seeds+items" (t-interval over seeds and documents, several seeds).
    interval: str = "items"
    # The standard error of delta behind the interval (points): the bootstrap replicates'
    # standard deviation, or seeds_and_items_interval's; df: its degrees of freedom (None: the
    # bootstrap's percentiles, no t).
    se: float | None = None
    df: float | None = None

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < SIGNIFICANCE_LEVEL


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p: a binomial test of the discordant pairs against 1/2."""
    from scipy.stats import binomtest

    if a_only + b_only == 0:
        return 1.0
    return float(binomtest(a_only, a_only + b_only, 0.5).pvalue)


def _bootstrap_deltas(per_item: Sequence[np.ndarray], iterations: int, seed: int) -> np.ndarray:
    """Bootstrap replicates of mean over strata of the stratum's mean per-item difference.

    Resampling n items of a stratum with replacement draws how often each distinct value comes
    up from a multinomial: the same distribution, without an (iterations × n) index array.
    """
    rng = np.random.default_rng(seed)
    total = np.zeros(iterations)
    for diffs in per_item:
        values, counts = np.unique(diffs, return_counts=True)
        draws = rng.multinomial(len(diffs), counts / len(diffs), size=iterations)
        total += draws @ values / len(diffs)
    return total / len(per_item)


@dataclass(frozen=True)
class SeedsAndItems:
    """The difference over seeds and documents, in fractions: its mean, its standard error's
    two parts, the Welch-Satterthwaite degrees of freedom and the 95% t-interval."""

    delta: float
    var_seeds: float  # variance of the per-seed differences / seeds
    var_items: float  # variance of the seed-averaged per-document differences / documents
    df: float
    low: float
    high: float


def seeds_and_items_interval(a: Sequence[np.ndarray], b: Sequence[np.ndarray]
                             ) -> SeedsAndItems:
    """95% interval of the column's difference A − B over S >= 2 seeds, a[t], b[t] of shape
    (seeds, items) per stratum t (T strata; a column's score is the mean over its strata).

    d_s, seed s's difference, varies from seed to seed (training noise), and every seed scored
    the same documents (a sample of the benchmark's). Its variance is taken as the sum of the
    two: var(d_s)/S (sample variance over seeds, S − 1 degrees of freedom) plus, per stratum,
    var_i(m_ti)/n_t/T² where m_ti is document i's difference averaged over the seeds (n_t − 1
    degrees of freedom). The interval is mean ± t(0.975, df)·SE, df by Welch-Satterthwaite.
    It is conservative: var(d_s) already holds part of the documents' noise.
    """
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    seeds, strata = diffs[0].shape[0], len(diffs)
    if seeds < 2:
        raise ValueError("the seeds-and-items interval needs two seeds or more")
    per_seed = np.mean([d.mean(axis=1) for d in diffs], axis=0)  # d_s
    var_seeds = float(per_seed.var(ddof=1)) / seeds
    parts = [float(d.mean(axis=0).var(ddof=1)) / d.shape[1] / strata**2 if d.shape[1] > 1
             else 0.0 for d in diffs]
    var_items = sum(parts)
    delta, total = float(per_seed.mean()), var_seeds + var_items
    if total == 0:
        return SeedsAndItems(delta, 0.0, 0.0, math.inf, delta, delta)
    df = total**2 / (var_seeds**2 / (seeds - 1) + sum(
        p**2 / (d.shape[1] - 1) for p, d in zip(parts, diffs, strict=True) if d.shape[1] > 1))
    half = float(stats.t.ppf(0.975, df)) * math.sqrt(total)
    return SeedsAndItems(delta, var_seeds, var_items, df, delta - half, delta + half)


def paired_comparison(a: Sequence[np.ndarray], b: Sequence[np.ndarray], *,
                      iterations: int = BOOTSTRAP_ITERATIONS, seed: int = 0) -> PairedComparison:
    """Compare aligned outcomes: a[t] and b[t] have shape (seeds, items) for stratum (task) t.

    Scores are the mean over strata of the mean over seeds and items (a column's score). The
    interval: one seed, the paired bootstrap over documents; several, seeds_and_items_interval.
    """
    if not a or len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        raise ValueError("paired outcomes need the same strata, seeds and items on both sides")
    if a[0].shape[0] > 1:
        both = seeds_and_items_interval(a, b)
        low, high, interval = both.low, both.high, "seeds+items"
        se, df = math.sqrt(both.var_seeds + both.var_items), both.df
    else:
        per_item = [(x - y).mean(axis=0) for x, y in zip(a, b, strict=True)]
        replicates = _bootstrap_deltas(per_item, iterations, seed)
        low, high = np.percentile(replicates, [2.5, 97.5])
        interval, se, df = "items", float(replicates.std(ddof=1)), None
    binary = all(np.isin(x, (0.0, 1.0)).all() for x in (*a, *b))
    a_only = sum(int(((x == 1) & (y == 0)).sum()) for x, y in zip(a, b, strict=True))
    b_only = sum(int(((x == 0) & (y == 1)).sum()) for x, y in zip(a, b, strict=True))
    score_a = 100 * float(np.mean([x.mean() for x in a]))
    score_b = 100 * float(np.mean([y.mean() for y in b]))
    return PairedComparison(
        n_items=sum(x.shape[1] for x in a), n_seeds=a[0].shape[0], score_a=score_a,
        score_b=score_b, delta=score_a - score_b, ci_low=100 * float(low),
        ci_high=100 * float(high), p_value=mcnemar_exact(a_only, b_only) if binary else None,
        a_only=a_only, b_only=b_only, interval=interval, se=100 * se, df=df)


def samples_dir(store: RunStore, run_id: str) -> Path:
    """Where the runner keeps a run's lm-eval output (per-sample rows included)."""
    return store.run_dir(run_id) / "lm_eval"


def item_outcomes(output_dir: Path, metrics: dict[str, str]) -> dict[str, dict[ItemKey, float]]:
    """task → {(doc_id, doc_hash): value} of the metric ("acc,none": metric "acc" under filter
    "none") that `metrics` names for each task; tasks not in `metrics` are skipped."""
    found: dict[str, dict[ItemKey, float]] = {}
    try:
        for task, row in read_samples(output_dir):
            if task not in metrics:
                continue
            name, _, filter_name = metrics[task].partition(",")
            where = f"per-sample outputs of {task} in {output_dir}"
            if not isinstance(row, dict):
                raise SpecError(f"{where}: a row is {type(row).__name__}, not an object")
            if row.get("filter", "none") != filter_name or name not in row:
                continue
            doc_id, doc_hash, value = row.get("doc_id"), row.get("doc_hash"), row[name]
            if not isinstance(doc_id, int) or not isinstance(doc_hash, str):
                raise SpecError(f"{where}: a row without its doc_id and doc_hash")
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                # e.g. f1's (gold, prediction) pairs: scored over the corpus, not per document
                raise SpecError(f"{where}: {name} of document {doc_id} is {value!r}, not a "
                                "number; the runs cannot be compared document by document")
            found.setdefault(task, {})[(doc_id, doc_hash)] = float(value)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:  # a cut line, or not text
        raise SpecError(f"corrupt per-sample outputs in {output_dir}: "
                        f"{str(err).splitlines()[0]}") from None
    return found


def record_outcomes(record: RunRecord, store: RunStore,
                    metric: str | None = None) -> dict[str, dict[ItemKey, float]] | None:
    """Per-item outcomes of every column task of a record, by the metric a table column reads
    (default: each task's primary); None when its per-sample outputs are not there."""
    keys = {task: record.metrics[task].key(metric) for task in record.column_tasks}
    if any(key is None for key in keys.values()):
        return None
    found = item_outcomes(samples_dir(store, record.run_id), keys)  # type: ignore[arg-type]
    return found if set(found) == set(keys) else None


def aligned(a: dict[ItemKey, float], b: dict[ItemKey, float], what: str) -> list[ItemKey]:
    """The items both sides scored, in order; a SpecError unless they scored the same ones."""
    if a.keys() != b.keys():
        shared = len(a.keys() & b.keys())
        raise SpecError(f"{what}: the two sides scored different items ({len(a)} and {len(b)}, "
                        f"{shared} shared); a paired comparison needs the same items")
    return sorted(a)


def compare_seeds(side_a: Sequence[dict[str, dict[ItemKey, float]]],
                  side_b: Sequence[dict[str, dict[ItemKey, float]]], tasks: Sequence[str],
                  what: str) -> PairedComparison:
    """Paired comparison over `tasks` of outcomes per seed (side_a[i] pairs with side_b[i])."""
    a_arrays, b_arrays = [], []
    for task in tasks:
        for side in (*side_a[1:], *side_b):
            keys = aligned(side_a[0][task], side[task], f"{what}, {task}")
        a_arrays.append(np.array([[seed[task][k] for k in keys] for seed in side_a]))
        b_arrays.append(np.array([[seed[task][k] for k in keys] for seed in side_b]))
    return paired_comparison(a_arrays, b_arrays)


def compare_records(records_a: list[RunRecord], records_b: list[RunRecord],
                    store: RunStore, metric: str | None = None) -> PairedComparison | None:
    """Two table cells (their records, one per seed) on their shared seeds; None when a side
    lacks per-sample outputs, they share no seed, or they scored different items."""
    by_seed_b = {rec.seed: rec for rec in records_b}
    pairs = [(rec, by_seed_b[rec.seed]) for rec in records_a if rec.seed in by_seed_b]
    outcomes = [(record_outcomes(x, store, metric), record_outcomes(y, store, metric))
                for x, y in pairs]
    if not outcomes or any(x is None or y is None for x, y in outcomes):
        return None
    try:
        return compare_seeds([x for x, _ in outcomes], [y for _, y in outcomes],  # type: ignore[misc]
                             pairs[0][0].column_tasks, "cells")
    except SpecError:
        return None


@dataclass(frozen=True)
class TaskComparison:
    task: str  # an lm-eval task, or "column <name>" for the mean over a column's tasks
    metric: str
    result: PairedComparison


def compare_runs(run_a: str, run_b: str, store: RunStore | None = None) -> list[TaskComparison]:
    """`hydrabench compare`: every task both runs scored, then their shared column if it has
    several tasks. Raises SpecError (before any output) when they scored different items."""
    store = store or RunStore()
    # load, not has(): a corrupt record is the one error line, naming its file
    rec_a, rec_b = records = [store.load(run_id) for run_id in (run_a, run_b)]
    tasks = [t for t in rec_a.column_tasks if t in rec_b.column_tasks]
    if not tasks:
        raise SpecError(f"runs {run_a} and {run_b} scored no lm-eval task in common")
    metrics = {}
    for task in tasks:
        primary_a, primary_b = (rec.metrics[task].primary for rec in records)
        if primary_a != primary_b:
            raise SpecError(f"{task}: the runs report different metrics ({primary_a}, "
                            f"{primary_b})")
        metrics[task] = primary_a
    outcomes = []
    for rec in records:
        found = item_outcomes(samples_dir(store, rec.run_id), metrics)
        missing = sorted(set(tasks) - set(found))
        if missing:
            raise SpecError(f"run {rec.run_id} has no per-sample outputs for "
                            f"{', '.join(missing)} in {samples_dir(store, rec.run_id)}")
        outcomes.append(found)
    what = f"{run_a} vs {run_b}"
    results = [TaskComparison(t, metrics[t], compare_seeds([outcomes[0]], [outcomes[1]], [t], what))
               for t in tasks]
    if len(tasks) > 1 and rec_a.column_tasks == rec_b.column_tasks:
        results.append(TaskComparison(f"column {rec_a.task}", "mean of the tasks",
                                      compare_seeds([outcomes[0]], [outcomes[1]], tasks, what)))
    return results


def format_p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def format_comparisons(run_a: str, run_b: str, comparisons: list[TaskComparison]) -> str:
    """One line per task: both scores, Δ = A − B, its 95% paired bootstrap CI, McNemar's p."""
    header = (f"{'task':32s} {'metric':18s} {'n':>6s} {'A':>7s} {'B':>7s} {'Δ (A−B)':>8s} "
              f"{'95% CI':>17s} {'McNemar p':>10s}")
    lines = [f"A: {run_a}", f"B: {run_b}", header]
    for c in comparisons:
        r = c.result
        interval = f"[{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
        lines.append(f"{c.task:32s} {c.metric:18s} {r.n_items:6d} {r.score_a:7.2f} "
                     f"{r.score_b:7.2f} {r.delta:+8.2f} {interval:>17s} {format_p(r.p_value):>10s}")
    lines.append("Δ in percentage points; CI: paired bootstrap over documents "
                 f"({BOOTSTRAP_ITERATIONS} resamples); p: McNemar's exact test on the documents "
                 "one run got right and the other wrong (n/a for non-binary metrics)")
    return "\n".join(lines)
