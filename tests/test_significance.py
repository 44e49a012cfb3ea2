"""Paired significance: McNemar's exact test and the paired bootstrap against scipy on planted
outcomes, and `hydrabench compare` on real lm-eval runs of the small local model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED
from scipy import stats

from hydrabench.cli import main
from hydrabench.evaluation.significance import mcnemar_exact, paired_comparison
from hydrabench.records.store import RunStore

MODEL = SHARED / "models" / "stories260K"
DATA = SHARED / "data"


def planted(n: int, both: int, a_only: int, b_only: int) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes of n items: `both` right on both sides, then the discordant ones, rest wrong."""
    a, b = np.zeros(n), np.zeros(n)
    a[:both + a_only] = 1
    b[:both] = 1
    b[both + a_only:both + a_only + b_only] = 1
    order = np.random.default_rng(1).permutation(n)  # the order of items must not matter
    return a[order], b[order]


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs() -> None:
    a, b = planted(400, 150, 30, 12)
    result = paired_comparison([a[None]], [b[None]])
    assert (result.a_only, result.b_only) == (30, 12)
    assert result.p_value == pytest.approx(stats.binomtest(30, 42, 0.5).pvalue, rel=1e-12)
    # The same p from its definition: twice the smaller tail of Binomial(42, 1/2).
    assert result.p_value == pytest.approx(2 * stats.binom.cdf(12, 42, 0.5), rel=1e-9)
    assert result.significant and result.p_value < 0.01
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert result.score_a == pytest.approx(45.0) and result.score_b == pytest.approx(40.5)
    assert result.delta == pytest.approx(4.5)


def test_bootstrap_interval_matches_scipy_percentile_bootstrap() -> None:
    a, b = planted(400, 150, 30, 12)
    result = paired_comparison([a[None]], [b[None]])
    reference = stats.bootstrap((a - b,), np.mean, n_resamples=20_000, method="percentile",
                                random_state=np.random.default_rng(7)).confidence_interval
    # Two Monte Carlo estimates of the same quantiles: equal up to resampling noise.
    assert result.ci_low == pytest.approx(100 * reference.low, abs=0.35)
    assert result.ci_high == pytest.approx(100 * reference.high, abs=0.35)
    assert result.ci_low < result.delta < result.ci_high
    same = paired_comparison([a[None]], [a[None]])
    assert (same.delta, same.ci_low, same.ci_high, same.p_value) == (0, 0, 0, 1.0)


def test_strata_average_tasks_and_seeds_pool_discordant_pairs() -> None:
    # Task 1: 100 items, A ahead by 20 discordant; task 2: 300 items, a tie. Two seeds each.
    t1 = [planted(100, 30, 20, 0) for _ in range(2)]
    t2 = [planted(300, 100, 10, 10) for _ in range(2)]
    a = [np.stack([x for x, _ in t1]), np.stack([x for x, _ in t2])]
    b = [np.stack([y for _, y in t1]), np.stack([y for _, y in t2])]
    result = paired_comparison(a, b)
    # The column's score is the mean of its tasks' means, not the pooled item mean.
    assert result.delta == pytest.approx((20.0 + 0.0) / 2)
    assert (result.a_only, result.b_only) == (2 * 30, 2 * 10)
    assert result.p_value == pytest.approx(stats.binomtest(60, 80).pvalue)
    assert result.n_items == 400 and result.n_seeds == 2
    graded = paired_comparison([np.full((1, 5), 0.5)], [np.zeros((1, 5))])
    assert graded.p_value is None and graded.delta == pytest.approx(50.0)  # not 0/1: no McNemar


# -- `hydrabench compare` on real runs ---------------------------------------------------------


def _eval(*extra: str) -> str:
    """Score the small model on 0-shot MMLU anatomy; the new run's id."""
    before = {r.run_id for r in RunStore().records()}
    assert main(["eval", "--model", str(MODEL), "--task", "mmlu_anatomy", *extra]) == 0
    (run_id,) = {r.run_id for r in RunStore().records()} - before
    return run_id


@pytest.mark.slow
@pytest.mark.skipif(not MODEL.exists() or not DATA.exists(), reason="needs ../shared")
def test_compare_runs_against_scipy_and_different_items_fail(
        store_env: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(DATA))
    zero_shot = _eval("--limit", "40")
    one_shot = _eval("--limit", "40", "--num-fewshot", "1")
    fewer = _eval("--limit", "30")
    capsys.readouterr()

    assert main(["compare", zero_shot, one_shot]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("mmlu_anatomy"))

    def outcomes(run_id: str) -> np.ndarray:
        path = RunStore().runs / run_id / "lm_eval" / "samples_mmlu_anatomy.jsonl"
        rows = sorted((json.loads(x) for x in path.read_text().splitlines()),
                      key=lambda r: r["doc_id"])
        return np.array([r["acc"] for r in rows])

    a, b = outcomes(zero_shot), outcomes(one_shot)
    a_only, b_only = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    p = stats.binomtest(a_only, a_only + b_only).pvalue if a_only + b_only else 1.0
    fields = line.split()
    assert fields[2] == "40"
    assert float(fields[3]) == pytest.approx(100 * a.mean(), abs=0.005)
    assert float(fields[4]) == pytest.approx(100 * b.mean(), abs=0.005)
    assert float(fields[5]) == pytest.approx(100 * (a.mean() - b.mean()), abs=0.005)
    assert float(fields[-1]) == pytest.approx(p, rel=0.01)
    assert "McNemar" in out

    assert main(["compare", zero_shot, fewer]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different items (40 and 30, 30 shared)" in err[0]
    assert main(["compare", zero_shot, "no-such-run"]) == 2
