"""Claims as tests: verdicts from planted records with known effects, Holm's correction by hand,
the claims file's checks, the runs a claims file plans, the report and `hydrabench claims`.

Records (and lm-eval per-sample outputs) are written straight into a temporary RunStore at the
run ids the table specs imply, so every effect is known by construction; nothing is trained.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import REPO

from hydrabench.atomic import write_json_atomic
from hydrabench.cli import main
from hydrabench.config.includes import use_only
from hydrabench.config.spec import RunSpec
from hydrabench.config.tables import load_table
from hydrabench.errors import SpecError
from hydrabench.pipeline.resolve import table_runs
from hydrabench.records.store import RunRecord, RunStore
from hydrabench.reports.claims import (
    Claim,
    Verdict,
    claim_row,
    decide,
    holm,
    judge_claims,
    load_claims,
    plan_claim_runs,
    run_claims,
)

PROFILE = "tiny"
N_ITEMS = 400
SEEDS = (0, 1, 2)


def write_scored(store: RunStore, spec: RunSpec, right: int,
                 train: dict[str, Any] | None = None, offset: int = 0) -> None:
    """A record whose every column task has items offset ... offset + right - 1 of N_ITEMS
    right (at offset 0 runs nest: a better one is right wherever a worse one is), with
    per-sample outputs."""
    metrics = {}
    lm_eval = store.runs / spec.run_id / "lm_eval"
    lm_eval.mkdir(parents=True, exist_ok=True)
    for task in spec.eval_tasks:
        outcomes = [1.0 if offset <= i < offset + right else 0.0 for i in range(N_ITEMS)]
        acc = right / N_ITEMS
        metrics[task] = {"metrics": {"acc,none": acc}, "stderr": {"acc,none": 0.02},
                         "primary": "acc,none", "value": acc, "n": N_ITEMS}
        (lm_eval / f"samples_{task}.jsonl").write_text("".join(
            json.dumps({"doc_id": i, "doc_hash": f"doc{i}", "filter": "none", "acc": o}) + "\n"
            for i, o in enumerate(outcomes)))
    training: dict[str, Any] = {"trained": True, "parameters": {"percent_param": 0.1}}
    if train is not None:
        training["metering"] = {"train": train}
    write_json_atomic(store.record_path(spec.run_id), {
        "run_id": spec.run_id, "method": spec.method, "task": spec.task, "seed": spec.seed,
        "metrics": metrics, "column_tasks": list(spec.eval_tasks), "training": training,
        "stand_in": True, "data_source": "synthetic suite (generated)"})


def plant(store: RunStore, table: str, right: dict[str, int], seeds=SEEDS,
          train: dict[str, dict[int, dict[str, Any]]] | None = None,
          offsets: dict[str, int] | None = None) -> None:
    """Records of the rows named, on every task of the table, `right` items right per task."""
    for row, _, spec in table_runs(load_table(table), PROFILE, seeds):
        if row.label in right:
            write_scored(store, spec, right[row.label],
                         (train or {}).get(row.label, {}).get(spec.seed),
                         (offsets or {}).get(row.label, 0))


def claims_file(tmp_path: Path, claims: list[dict[str, Any]], name: str = "mine") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "title": "mine", "seeds": list(SEEDS),
                                    "claims": claims}, allow_unicode=True))
    return str(path)


def paired(id_: str, a: str, b: str, margin: float = 0.0, direction: str = "higher",
           table: str = "table1") -> dict[str, Any]:
    return {"id": id_, "words": f"{a} beats {b}", "where": "Table 1", "kind": "paired",
            "table": table, "column": "general", "a": a, "b": b, "margin": margin,
            "direction": direction}


# -- Holm ---------------------------------------------------------------------------------------


def test_holm_matches_a_hand_computation() -> None:
    # Sorted: 0.01 × 4 = 0.04; 0.03 × 3 = 0.09; 0.04 × 2 = 0.08 → kept monotone at 0.09;
    # 0.2 × 1 = 0.2. Back in the input's order:
    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02]) == pytest.approx([0.02])


def _verdict(id_: str, p_sup: float, p_con: float) -> Verdict:
    claim = Claim(id=id_, words="", where="", kind="paired")
    return Verdict(claim, p_supported=p_sup, p_contradicted=p_con,
                   p=min(1.0, 2 * min(p_sup, p_con)))


def test_decide_applies_holm_over_the_claims_tested_together() -> None:
    # Two-sided p: 0.01, 0.04, 0.03, 0.2 → Holm 0.04, 0.09, 0.09, 0.2 (as above).
    verdicts = [_verdict("a", 0.005, 0.995), _verdict("b", 0.98, 0.02),
                _verdict("c", 0.015, 0.985), _verdict("d", 0.9, 0.1)]
    untested = Verdict(Claim(id="e", words="", where="", kind="analysis"))
    decide([*verdicts, untested])
    assert [v.p_holm for v in verdicts] == pytest.approx([0.04, 0.09, 0.09, 0.2])
    # c alone (p = 0.03) would be supported; tested with three others it is not.
    assert [v.verdict for v in verdicts] == ["supported", "inconclusive", "inconclusive",
                                             "inconclusive"]
    assert untested.verdict == "not tested" and untested.p_holm is None
    alone = _verdict("c", 0.015, 0.985)
    decide([alone])
    assert alone.verdict == "supported" and alone.p_holm == pytest.approx(0.03)
    contra = _verdict("b", 0.999, 0.001)
    decide([contra])
    assert contra.verdict == "contradicted"


# -- verdicts from planted records --------------------------------------------------------------


def test_supported_contradicted_inconclusive_from_planted_records(store: RunStore,
                                                                  tmp_path: Path) -> None:
    # Per task: r=32 right on items 0-199 of 400; LoRA-Split 4×8 on 0-279 (+20 points), r=8
    # on 0-119 (−20), r=16 on 20-222: 23 items won, 20 lost, +0.75 points, within the noise.
    plant(store, "table1", {"LoRA (r=32)": 200, "LoRA-Split (4×8)": 280, "LoRA (r=8)": 120,
                            "LoRA (r=16)": 203}, offsets={"LoRA (r=16)": 20})
    path = claims_file(tmp_path, [
        paired("split", "LoRA-Split (4×8)", "LoRA (r=32)"),
        paired("small", "LoRA (r=8)", "LoRA (r=32)"),
        paired("close", "LoRA (r=16)", "LoRA (r=32)"),
        # The same +20 points, but claimed lower: contradicted.
        paired("lower", "LoRA-Split (4×8)", "LoRA (r=32)", direction="lower"),
        # Non-inferiority within 25 points: r=8 is 20 behind, so it holds.
        paired("within", "LoRA (r=8)", "LoRA (r=32)", margin=-25.0)])
    verdicts = {v.claim.id: v for v in judge_claims(load_claims(path), PROFILE, None, store)}
    assert {k: v.verdict for k, v in verdicts.items()} == {
        "split": "supported", "small": "contradicted", "close": "inconclusive",
        "lower": "contradicted", "within": "supported"}
    split = verdicts["split"].binding
    assert split is not None and split.value == pytest.approx(20.0)
    assert split.low < 20.0 < split.high and split.n_seeds == 3
    assert verdicts["small"].binding.value == pytest.approx(-20.0)  # type: ignore[union-attr]
    close = verdicts["close"].binding
    assert close is not None and close.value == pytest.approx(0.75)
    # Per-item differences +1 (23 items), −1 (20), 0 (357) in each of the column's 5 tasks,
    # alike over seeds: a task's bootstrap standard error is sqrt(var / 400), the column's
    # (the mean of 5 tasks) that over sqrt(5); the detectable effect is 2.8 of them.
    var = 43 / 400 - (3 / 400) ** 2
    se = 100 * math.sqrt(var / 400) / math.sqrt(5)
    assert close.mde() == pytest.approx(2.80 * se, rel=0.2)
    assert all(v.p_holm is not None for v in verdicts.values())


def test_a_claim_of_several_pairs_is_decided_by_its_weakest(store: RunStore,
                                                            tmp_path: Path) -> None:
    # The gate's row: items 20-317 right against HydraLoRA's 0-299: 20 lost, 18 won, +0.5.
    plant(store, "figure6", {"HydraLoRA": 300, "w/o shared A (LoRA-Split 4×8)": 200,
                             "w/o MoE (LoRA r=8)": 150, "w/o gate (uniform)": 298},
          offsets={"w/o gate (uniform)": 20})
    ablation = {"id": "ablation", "words": "each part helps", "where": "Fig. 6", "kind": "paired",
                "table": "figure6", "column": "general", "a": "HydraLoRA",
                "b": ["w/o shared A (LoRA-Split 4×8)", "w/o MoE (LoRA r=8)",
                      "w/o gate (uniform)"]}
    (verdict,) = judge_claims(load_claims(claims_file(tmp_path, [ablation])), PROFILE, None,
                              store)
    assert verdict.verdict == "inconclusive"  # the gate's +0.5 points decide nothing
    assert verdict.binding is not None and verdict.binding.b == "w/o gate (uniform)"
    assert verdict.binding.value == pytest.approx(0.5)
    # Its run ids are figure6's, on the MMLU column only (4 rows × 3 seeds).
    table = load_table("figure6")
    assert set(verdict.run_ids) == {spec.run_id for row, task, spec in table_runs(table,
        PROFILE, SEEDS) if task == "general" and row.label in {"HydraLoRA", *ablation["b"]}}


def shipped_claim(claim_id: str) -> dict[str, Any]:
    """One claim of tasks/claims/hydralora.yaml as written there."""
    raw = yaml.safe_load((REPO / "tasks" / "claims" / "hydralora.yaml").read_text())
    return next(c for c in raw["claims"] if c["id"] == claim_id)


AUTO = "HydraLoRA (r=8, N=auto)"


@pytest.mark.parametrize(("right", "offsets", "expected", "best", "effect"), [
    # auto on items 0-299 per task; N=4, the best fixed N, on 0-296: +0.75 points, well past −1.
    ({AUTO: 300, "HydraLoRA (r=8, N=4)": 297}, {}, "supported", "HydraLoRA (r=8, N=4)", 0.75),
    # N=6 right on 0-379: auto is 20 points behind it, whatever the other N score.
    ({AUTO: 300, "HydraLoRA (r=8, N=6)": 380}, {}, "contradicted", "HydraLoRA (r=8, N=6)",
     -20.0),
    # N=3 on 20-323: 20 items lost, 24 won against auto: −1.0 points, on the margin.
    ({AUTO: 300, "HydraLoRA (r=8, N=3)": 304}, {"HydraLoRA (r=8, N=3)": 20}, "inconclusive",
     "HydraLoRA (r=8, N=3)", -1.0),
])
def test_auto_heads_against_every_fixed_n_is_decided_by_the_best_n(
        store: RunStore, tmp_path: Path, right: dict[str, int], offsets: dict[str, int],
        expected: str, best: str, effect: float) -> None:
    # The other fixed N score well below auto: only the best N can decide the claim.
    claim = shipped_claim("heads-auto-vs-fixed")
    plant(store, "heads", {**dict.fromkeys(claim["b"], 200), **right}, offsets=offsets)
    (verdict,) = judge_claims(load_claims(claims_file(tmp_path, [claim])), PROFILE, None, store)
    assert verdict.verdict == expected
    assert len(verdict.effects) == len(claim["b"]) == 5  # auto against each fixed N
    assert verdict.binding is not None and verdict.binding.b == best
    assert verdict.binding.value == pytest.approx(effect)


def test_equal_parameters_names_pairs_of_unequal_budgets(store: RunStore,
                                                        tmp_path: Path) -> None:
    # Every planted record has 0.1 %Param; one LoRA-Split row is rewritten to 0.2.
    plant(store, "table1", {"LoRA (r=32)": 200, "LoRA-Split (8×4)": 280,
                            "LoRA-Split (4×8)": 280})
    for row, _, spec in table_runs(load_table("table1"), PROFILE, SEEDS):
        if row.label == "LoRA-Split (4×8)":
            record = json.loads(store.record_path(spec.run_id).read_text())
            record["training"]["parameters"]["percent_param"] = 0.2
            write_json_atomic(store.record_path(spec.run_id), record)
    claim = {**paired("split", "LoRA-Split (8×4)", "LoRA (r=32)"), "equal_parameters": True,
             "a": ["LoRA-Split (8×4)", "LoRA-Split (4×8)"]}
    (verdict,) = judge_claims(load_claims(claims_file(tmp_path, [claim])), PROFILE, None, store)
    assert verdict.verdict == "supported"
    assert verdict.note == "unequal budgets: LoRA-Split (4×8) 0.2 %Param, LoRA (r=32) 0.1"


def test_ordering_is_each_row_against_the_next(store: RunStore, tmp_path: Path) -> None:
    plant(store, "table1", {"LoRA (r=32)": 300, "LoRA (r=16)": 250, "LoRA (r=8)": 260})
    order = {"id": "rank", "words": "rank helps", "where": "Table 1", "kind": "ordering",
             "table": "table1", "column": "general",
             "rows": ["LoRA (r=32)", "LoRA (r=16)", "LoRA (r=8)"]}
    (verdict,) = judge_claims(load_claims(claims_file(tmp_path, [order])), PROFILE, None, store)
    assert [(e.a, e.b) for e in verdict.effects] == [("LoRA (r=32)", "LoRA (r=16)"),
                                                     ("LoRA (r=16)", "LoRA (r=8)")]
    assert [e.value for e in verdict.effects] == pytest.approx([12.5, -2.5])
    assert verdict.verdict == "contradicted"
    assert verdict.binding is not None and verdict.binding.a == "LoRA (r=16)"


def metering(wall_s: float, kwh: float | None = None, measured: bool = False) -> dict[str, Any]:
    return {"throughput": {"wall_s": wall_s, "tokens_per_s": 1000 / wall_s,
                           "step_time_mean_s": wall_s / 10},
            "energy": {"total_kwh": kwh, "energy_measured": measured}}


def test_ratio_claims_read_the_training_metering(store: RunStore, tmp_path: Path) -> None:
    hydra, lora = "HydraLoRA (r=8, N=auto)", "LoRA (r=32)"
    walls = {hydra: {0: 10.0, 1: 11.0, 2: 9.0}, lora: {0: 21.0, 1: 21.0, 2: 19.0}}
    plant(store, "figure5", {hydra: 200, lora: 200},
          train={row: {s: metering(w) for s, w in by_seed.items()}
                 for row, by_seed in walls.items()})

    def ratio(id_: str, metric: str, factor: float = 1.0) -> dict[str, Any]:
        return {"id": id_, "words": "faster", "where": "Fig. 5", "kind": "ratio",
                "table": "figure5", "a": hydra, "b": lora, "metric": metric, "factor": factor,
                "paper": "1.96×"}

    path = claims_file(tmp_path, [ratio("run", "wall_s"), ratio("speed", "tokens_per_s"),
                                  ratio("triple", "wall_s", 3.0), ratio("energy", "energy_kwh")])
    verdicts = {v.claim.id: v for v in judge_claims(load_claims(path), PROFILE, None, store)}
    logs = [math.log(walls[lora][s] / walls[hydra][s]) for s in SEEDS]
    run = verdicts["run"].binding
    assert run is not None and run.value == pytest.approx(math.exp(sum(logs) / 3))
    assert run.low < run.value < run.high and run.df == 2
    # Tokens per second is the same factor the other way up.
    assert verdicts["speed"].binding.value == pytest.approx(run.value)  # type: ignore[union-attr]
    assert verdicts["run"].verdict == "supported"
    assert verdicts["triple"].verdict == "contradicted"  # ≈2.0× is not 3×
    assert verdicts["energy"].verdict == "not tested"
    assert "no energy_kwh" in verdicts["energy"].note
    assert verdicts["run"].paper == "1.96×"


def test_one_seed_ratio_is_inconclusive_and_says_why(store: RunStore, tmp_path: Path) -> None:
    hydra, lora = "HydraLoRA (r=8, N=auto)", "LoRA (r=32)"
    plant(store, "figure5", {hydra: 200, lora: 200}, seeds=(0,),
          train={hydra: {0: metering(10.0)}, lora: {0: metering(20.0)}})
    claim = {"id": "run", "words": "faster", "where": "Fig. 5", "kind": "ratio",
             "table": "figure5", "a": hydra, "b": lora, "metric": "wall_s"}
    (verdict,) = judge_claims(load_claims(claims_file(tmp_path, [claim])), PROFILE, (0,), store)
    assert verdict.verdict == "inconclusive" and "2 or more seeds" in verdict.note
    assert verdict.binding is not None and verdict.binding.value == pytest.approx(2.0)
    row = claim_row(verdict)
    assert row["effect"] == pytest.approx(2.0) and row["ci_low"] is None and row["mde"] is None


def test_missing_records_and_analysis_are_not_tested(store: RunStore, tmp_path: Path) -> None:
    plant(store, "table1", {"LoRA (r=32)": 200})
    path = claims_file(tmp_path, [paired("gone", "LoRA (r=8)", "LoRA (r=32)"),
                                  {"id": "fig3", "words": "A alike", "where": "Fig. 3",
                                   "kind": "analysis"}])
    gone, fig3 = judge_claims(load_claims(path), PROFILE, None, store)
    assert gone.verdict == "not tested" and gone.note == "no records for LoRA (r=8)"
    assert fig3.verdict == "not tested" and "without `analysis:`" in fig3.note


# -- the claims file ----------------------------------------------------------------------------


def test_shipped_claims_use_the_tables_rows() -> None:
    claims = load_claims()
    assert claims.name == "hydralora" and claims.seeds == (0, 1, 2)
    ids = {c.id for c in claims.claims}
    assert {"obs1-split-beats-rank", "t2-hydra-vs-lora32", "t2-hydra-vs-split", "fig5-faster",
            "fig5-energy", "fig6-ablation", "heads-auto-vs-fixed"} <= ids
    kinds = {c.kind for c in claims.claims}
    assert kinds == {"paired", "ordering", "ratio", "analysis"}


@pytest.mark.parametrize(("change", "message"), [
    ({"a": "LoRA (r=64)"}, "unknown row of table table1"),
    ({"kind": "pairs"}, "did you mean 'paired'"),
    ({"column": "mmlu"}, "unknown score column of table table1"),
    ({"table": "table9"}, "unknown table 'table9'"),
    ({"direction": "up"}, "unknown direction"),
    ({"colour": "red"}, "unknown key(s) ['colour']"),
    ({"margin": "big"}, "could not convert"),
])
def test_bad_claims_are_one_line_before_any_work(tmp_path: Path, change: dict[str, Any],
                                                 message: str) -> None:
    claim = {**paired("x", "LoRA (r=8)", "LoRA (r=32)"), **change}
    with pytest.raises(SpecError, match=None) as err:
        load_claims(claims_file(tmp_path, [claim]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_repeated_ids_and_unknown_names_are_refused(tmp_path: Path) -> None:
    claim = paired("x", "LoRA (r=8)", "LoRA (r=32)")
    with pytest.raises(SpecError, match="claim ids repeat"):
        load_claims(claims_file(tmp_path, [claim, claim]))
    with pytest.raises(SpecError, match=r"unknown claims 'hydrlora'.*did you mean 'hydralora'"):
        load_claims("hydrlora")


def test_a_claims_file_under_include_path_is_found_by_name(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    (folder / "claims").mkdir(parents=True)
    (folder / "claims" / "own.yaml").write_text(yaml.safe_dump({
        "name": "own", "claims": [paired("x", "LoRA (r=8)", "LoRA (r=32)")]},
        allow_unicode=True))
    with pytest.raises(SpecError, match="unknown claims 'own'"):
        load_claims("own")
    try:
        use_only([folder], "--include-path")
        assert [c.id for c in load_claims("own").claims] == ["x"]
    finally:
        use_only([], "--include-path")


@pytest.mark.slow
def test_a_claims_folder_does_not_move_run_ids(tmp_path: Path) -> None:
    """Table 1's run ids with tasks/ as shipped and with a copy of it without claims/: equal.
    The copy is read through HYDRABENCH_TASKS_DIR in a fresh process (read at import)."""
    copy = tmp_path / "tasks"
    shutil.copytree(REPO / "tasks", copy, ignore=shutil.ignore_patterns("claims", "__pycache__"))
    script = ("from hydrabench.config.tables import load_table\n"
              "from hydrabench.pipeline.resolve import table_runs\n"
              "print(' '.join(s.run_id for _, _, s in table_runs(load_table('table1'), 'tiny')))")
    ids = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, env={**os.environ, **env}).stdout.split()
           for env in ({}, {"HYDRABENCH_TASKS_DIR": str(copy)})]
    assert (REPO / "tasks" / "claims" / "hydralora.yaml").is_file()
    assert len(ids[0]) == len(load_table("table1").rows) and ids[0] == ids[1]


# -- running and reporting ----------------------------------------------------------------------


def test_plan_runs_only_the_claims_rows_and_columns(store_env: Path) -> None:
    """The sweeps a claims file plans, with a stand-in for runner.execute that writes records:
    each run id once per table and seeds, finished runs not run again."""
    executed: list[str] = []

    def execute(spec: RunSpec) -> RunRecord:
        runs = RunStore()
        if not runs.has(spec.run_id):
            executed.append(spec.run_id)
            write_scored(runs, spec, 100)
        return runs.load(spec.run_id)

    claims = load_claims()
    sweeps = plan_claim_runs(claims, PROFILE, (0,), execute)
    planned = [run.spec for sweep in sweeps for run in sweep.runs]
    # table1: 6 LoRA rows on MMLU; table2: 3 rows, 2 of them table1's runs; figure6: 5 rows on
    # MMLU only (Fig. 3's analysis adds the summed LoRA-Split), 2 of them table1's (LoRA-Split
    # 4×8, LoRA r=8); figure5: 2 rows on GSM8K; heads: 6 rows on MMLU, 2 of them others' runs
    # (N=auto is table2's, N=4 figure6's HydraLoRA).
    assert {s.task for s in planned} == {"general", "math"}
    assert len(planned) == 6 + 3 + 5 + 2 + 6
    assert len({s.run_id for s in planned}) == 6 + 1 + 3 + 2 + 4
    for sweep in sweeps:
        sweep.run_local()
    assert sorted(executed) == sorted({s.run_id for s in planned})
    executed.clear()
    for sweep in plan_claim_runs(claims, PROFILE, (0,), execute):
        sweep.run_local()
    assert executed == []


def record_in_log(spec: RunSpec, store: RunStore | None = None) -> RunRecord:
    """A stand-in for runner.execute that a job process can import: writes a scored record and
    appends "pid run id" to $CLAIMS_LOG."""
    runs = store or RunStore()
    if not runs.has(spec.run_id):
        with open(os.environ["CLAIMS_LOG"], "a") as log:
            log.write(f"{os.getpid()} {spec.run_id}\n")
        write_scored(runs, spec, 100)
    return runs.load(spec.run_id)


@pytest.mark.slow  # two spawned job processes import the harness: ~15 s
def test_claims_in_two_processes_run_the_timed_tables_first_and_alone(
        store_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--jobs 2: Fig. 5's runs (its ratio claims time them) in this process one at a time,
    before any other; every other planned run once, in two job processes."""
    log = store_env / "claims.log"
    monkeypatch.setenv("CLAIMS_LOG", str(log))
    claims = load_claims()
    sweeps = plan_claim_runs(claims, PROFILE, (0,), record_in_log)
    timed = {r.spec.run_id for s in sweeps if s.table.name == "figure5" for r in s.runs}
    every = {r.spec.run_id for s in sweeps for r in s.runs}
    monkeypatch.setattr("hydrabench.pipeline.run.execute", record_in_log)
    run_claims(seeds=(0,), jobs=2, out_dir=store_env / "reports")
    ran = [line.split() for line in log.read_text().splitlines()]
    assert sorted(run_id for _, run_id in ran) == sorted(every)  # each once
    assert {run_id for _, run_id in ran[:len(timed)]} == timed
    assert {pid for pid, _ in ran[:len(timed)]} == {str(os.getpid())}
    others = {pid for pid, _ in ran[len(timed):]}  # one job process may have taken them all
    assert 1 <= len(others) <= 2 and str(os.getpid()) not in others


def test_claims_on_slurm_submit_each_run_once_and_write_the_report_after_waiting(
        store_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--executor slurm through the tables' sweeps, with a stand-in for submitit's Slurm
    executor and for squeue (the real submission has its test in test_sweep.py): every planned
    run submitted once (a run two tables share goes with the first); no report without --wait;
    --wait on jobs that ended without a record is one error and no report; once the records
    are there, the report."""
    from test_sweep import StandInExecutor

    from hydrabench.config.spec import spec_from_dict
    from hydrabench.pipeline.sweep import Sweep

    made: list[StandInExecutor] = []
    submit = Sweep.submit_slurm
    monkeypatch.setattr(Sweep, "submit_slurm", lambda self: submit(
        self, executor_class=lambda folder: made.append(StandInExecutor(folder)) or made[-1]))
    queue = {f"10_{i}": "PENDING" for i in range(50)}
    monkeypatch.setattr("hydrabench.pipeline.sweep.queued_jobs", lambda: queue)
    planned = {r.spec.run_id: r.spec for s in plan_claim_runs(load_claims(), PROFILE, (0,),
                                                              record_in_log) for r in s.runs}
    reports = store_env / "reports"

    assert run_claims(seeds=(0,), executor="slurm", out_dir=reports) == []
    submitted = [spec_from_dict(d).run_id for e in made for d in e.specs]
    assert sorted(submitted) == sorted(planned) and not reports.exists()

    queue.clear()  # the jobs left the queue without writing a record
    with pytest.raises(SpecError, match=r"run\(s\) failed on Slurm"):
        run_claims(seeds=(0,), executor="slurm", wait=True, out_dir=reports)
    assert not reports.exists()

    for spec in planned.values():
        write_scored(RunStore(), spec, 100)
    arrays = len(made)
    paths = run_claims(seeds=(0,), executor="slurm", wait=True, out_dir=reports)
    assert {p.name for p in paths} >= {"claims.md", "claims.csv", "claims.tex"}
    assert len(made) == arrays  # every run finished: nothing submitted again


def test_cli_report_only_writes_md_csv_tex_with_a_verdict_per_claim(
        store_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = RunStore(store_env / "results")
    plant(store, "table1", {"LoRA (r=32)": 200, "LoRA (r=16)": 150, "LoRA (r=8)": 100,
                            "LoRA-Split (16×2)": 280, "LoRA-Split (8×4)": 280,
                            "LoRA-Split (4×8)": 280})
    assert main(["claims", "--report-only"]) == 0
    printed = capsys.readouterr().out.split()
    reports = store_env / "reports"
    assert sorted(Path(p).name for p in printed) == ["claims.csv", "claims.md", "claims.tex"]
    frame = pd.read_csv(reports / "claims.csv").set_index("id")
    claims = load_claims()
    assert list(frame.index) == [c.id for c in claims.claims]
    assert frame.loc["obs1-split-beats-rank", "verdict"] == "supported"
    assert frame.loc["t1-rank-order", "verdict"] == "supported"
    assert frame.loc["fig6-ablation", "verdict"] == "not tested"
    assert frame.loc["obs1-split-beats-rank", "paper"] == "Δ +0.23, +0.35, +0.24"
    assert frame.loc["obs1-split-beats-rank", "effect"] == pytest.approx(20.0)
    assert frame.loc["obs1-split-beats-rank", "unit"] == "points"
    assert bool(frame.loc["obs1-split-beats-rank", "stand_in"]) is True
    md = (reports / "claims.md").read_text()
    assert "Holm" in md and "stand-in" in md and "| +20.00 |" in md
    assert "synthetic suite (generated)" in md
    tex = (reports / "claims.tex").read_text()
    assert r"\begin{tabular}" in tex and "obs1-split-beats-rank" in tex
    # Nothing ran: --report-only reads records only.
    assert sorted(p.name for p in (store_env / "results" / "runs").iterdir()) == sorted(
        spec.run_id for row, _, spec in table_runs(load_table("table1"), PROFILE, SEEDS)
        if row.method == "lora" or row.method == "lora-split")


def test_cli_bad_claims_file_is_one_line(store_env: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["claims", "nosuch", "--report-only"]) == 2
    assert "unknown claims 'nosuch'" in capsys.readouterr().err
    assert not (store_env / "reports").exists()


def test_run_claims_report_only_with_no_records(store_env: Path) -> None:
    paths = run_claims(report_only=True, seeds=(0,))
    frame = pd.read_csv(paths[1])
    assert set(frame["verdict"]) == {"not tested"}


def test_a_claims_folder_in_an_included_folder_does_not_move_its_run_ids(tmp_path: Path) -> None:
    """An included task at the folder's top level (as docs/custom-tasks.md's example) keeps its
    fingerprint when the folder gains claims/."""
    from hydrabench.records.provenance import task_fingerprints

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "capitals.yaml").write_text("task: capitals\ndataset_path: json\n"
                                          "output_type: multiple_choice\n")

    def fingerprint() -> dict[str, str]:
        try:
            use_only([folder], "--include-path")
            return task_fingerprints(("capitals",))["capitals"]
        finally:
            use_only([], "--include-path")

    before = fingerprint()
    (folder / "claims").mkdir()
    (folder / "claims" / "own.yaml").write_text(yaml.safe_dump({
        "name": "own", "claims": [paired("x", "LoRA (r=8)", "LoRA (r=32)")]},
        allow_unicode=True))
    assert fingerprint() == before


def test_an_energy_ratio_says_when_energy_was_estimated(store: RunStore, tmp_path: Path) -> None:
    hydra, lora = "HydraLoRA (r=8, N=auto)", "LoRA (r=32)"
    kwh = {hydra: (1.0, 1.1, 0.9), lora: (2.0, 2.1, 1.9)}
    claim = {"id": "energy", "words": "less energy", "where": "Fig. 5", "kind": "ratio",
             "table": "figure5", "a": hydra, "b": lora, "metric": "energy_kwh"}
    for measured in (True, False):
        plant(store, "figure5", {hydra: 200, lora: 200},
              train={row: {s: metering(10.0, kwh[row][s], measured) for s in SEEDS}
                     for row in kwh})
        (verdict,) = judge_claims(load_claims(claims_file(tmp_path, [claim])), PROFILE, None,
                                  store)
        assert verdict.verdict == "supported"
        assert verdict.binding is not None and 1.9 < verdict.binding.value < 2.1
        assert ("energy estimated" in verdict.note) is not measured


def test_cli_claims_runs_what_they_need_then_reports(store_env: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`hydrabench claims --seeds 0` with a stand-in for runner.execute (training is what it
    would run): every planned run once, then the report from their records."""
    import hydrabench.pipeline.run

    executed: list[str] = []

    def execute(spec: RunSpec) -> RunRecord:
        runs = RunStore()
        if not runs.has(spec.run_id):
            executed.append(spec.run_id)
            write_scored(runs, spec, 300 if spec.method == "lora-split" else 200,
                         metering(20.0 if spec.method == "lora" else 10.0))
        return runs.load(spec.run_id)

    monkeypatch.setattr(hydrabench.pipeline.run, "execute", execute)
    assert main(["claims", "--seeds", "0"]) == 0
    assert len(executed) == len(set(executed)) == 16
    frame = pd.read_csv(store_env / "reports" / "claims.csv").set_index("id")
    assert frame.loc["obs1-split-beats-rank", "verdict"] == "supported"
    assert frame.loc["fig5-faster", "effect"] == pytest.approx(2.0)
    assert frame.loc["fig5-faster", "verdict"] == "inconclusive"  # one seed
    # The stand-in records name no artifact: the analysis has no matrices to read.
    assert frame.loc["obs2-a-alike-b-differ", "verdict"] == "not tested"
    assert "no artifact" in frame.loc["obs2-a-alike-b-differ", "note"]
