"""Reports from hand-made records: cells, Δ, bold, CSV, mean ± CI, LaTeX, figures, CLI.

Records are written straight into a temporary RunStore at the run ids the table specs imply, so
every expected number here is known by construction; nothing is trained or evaluated.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
import subprocess
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from scipy import stats

from hydrabench.atomic import write_json_atomic
from hydrabench.cli import main
from hydrabench.config.spec import RunSpec
from hydrabench.config.tables import Column, TableSpec, load_table
from hydrabench.pipeline.resolve import resolve_spec, table_runs
from hydrabench.pipeline.sweep import plan_sweep
from hydrabench.records.store import RunRecord, RunStore, TaskMetrics
from hydrabench.reports import write_report
from hydrabench.reports.cells import mean_ci
from hydrabench.reports.figures import write_figure5, write_figure6
from hydrabench.reports.tables import latex_escape, write_table_report

PROFILE = "tiny"
# The labels of a record scored on the synthetic suite (what the runner writes on tiny).
STAND_IN = {"stand_in": True, "data_source": "train: synthetic suite (generated); "
                                             "eval: synthetic suite (generated)"}
# Rows of these methods get records; every other row must come out as "—".
FILLED = {"base", "full", "lora", "lora-split", "hydralora"}
STDERR = 0.01  # of every lm-eval metric, as a fraction
N_PER_TASK = 50


def task_score(row_index: int, task: str, seed: int) -> float:
    """A distinct fraction per row, lm-eval task and seed, so any mix-up shows in the cells."""
    return 0.20 + 0.02 * row_index + 0.001 * (sum(map(ord, task)) % 7) + 0.004 * seed


def pass_at_10(row_index: int, task: str, seed: int) -> float:
    return task_score(row_index, task, seed) + 0.1


def train_metering(kwh: float | None, wall_s: float, measured: bool) -> dict[str, Any]:
    """A Meter result's shape: measured = NVML + RAPL (CodeCarbon off), else CodeCarbon."""
    sources = (("measured:nvml", "measured:rapl", "unavailable: codecarbon disabled") if measured
               else ("unavailable: no visible GPU", "estimated:codecarbon",
                     "estimated:codecarbon"))
    return {"energy": {"total_kwh": kwh, "energy_measured": measured and kwh is not None,
                       **dict(zip(("gpu_source", "cpu_source", "ram_source"), sources,
                                  strict=True))},
            "throughput": {"wall_s": wall_s, "tokens_per_s": 1000.0 / wall_s}}


def make_record(spec: RunSpec, row_index: int, *, trained: bool = True,
                with_pass_at_10: bool = True, metering: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """The parts of a runner record that reports read."""
    metrics = {}
    for task in spec.eval_tasks:
        values = {"acc,none": task_score(row_index, task, spec.seed)}
        if spec.task == "code_p10" and with_pass_at_10:
            values["pass@10,none"] = pass_at_10(row_index, task, spec.seed)
        metrics[task] = {"metrics": values, "stderr": dict.fromkeys(values, STDERR),
                         "primary": "acc,none", "value": values["acc,none"], "n": N_PER_TASK}
    training: dict[str, Any] = {"trained": trained,
                                "parameters": {"percent_param": 0.1 * (row_index + 1)}}
    if metering is not None:
        training["metering"] = {"train": metering}
    return {"run_id": spec.run_id, "method": spec.method, "task": spec.task, "seed": spec.seed,
            "metrics": metrics, "column_tasks": list(spec.eval_tasks), "training": training}


def fill(store: RunStore, table: TableSpec, seeds: tuple[int, ...] = (0,),
         skip: Collection[tuple[str, int]] = ()) -> None:
    """Write records for the FILLED rows, less the (row label, seed) pairs in `skip`.

    The base row is untrained and the Full FT row's code runs lack pass@10.
    """
    index = {row.label: i for i, row in enumerate(table.rows)}
    for row, _, spec in table_runs(table, PROFILE, seeds):
        if row.method in FILLED and (row.label, spec.seed) not in skip:
            write_json_atomic(store.record_path(spec.run_id), make_record(
                spec, index[row.label], trained=row.method != "base",
                with_pass_at_10=row.label != "Full FT"))


@functools.cache
def eval_tasks(task: str) -> tuple[str, ...]:
    """The lm-eval tasks that score a column on the profile (resolving specs costs a YAML read)."""
    return resolve_spec("lora", task, PROFILE).eval_tasks


def expected_score(table: TableSpec, row_label: str, task: str, seed: int,
                   metric=task_score) -> float:
    index = next(i for i, r in enumerate(table.rows) if r.label == row_label)
    tasks = eval_tasks(task)
    return 100 * sum(metric(index, t, seed) for t in tasks) / len(tasks)


def markdown_table(text: str) -> pd.DataFrame:
    """The pipe table of a Markdown report, as strings."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return pd.DataFrame(cells[2:], columns=cells[0])


@pytest.fixture(scope="module")
def table2() -> TableSpec:
    return load_table("table2")


# -- cells -------------------------------------------------------------------------------------


def test_table2_every_cell_value_delta_and_dash(store: RunStore, table2: TableSpec,
                                                tmp_path: Path) -> None:
    fill(store, table2)
    md, _, _, raw = write_table_report(table2, PROFILE, (0,), store, tmp_path / "reports")
    tidy = pd.read_csv(raw).set_index(["row", "paper_column"])
    shown = markdown_table(md.read_text()).set_index("Method")
    for index, row in enumerate(table2.rows):
        for column in table2.columns:
            cell = tidy.loc[(row.label, column.label)]
            paper = row.paper.get(column.key)
            assert (cell["paper_value"] == paper) if paper is not None else pd.isna(
                cell["paper_value"])
            if column.kind == "param":
                expected = 0.1 * (index + 1) if row.method in FILLED - {"base"} else None
            elif row.method not in FILLED or (column.metric and row.label == "Full FT"):
                expected = None  # no record, or no pass@10 in it
            else:
                metric = pass_at_10 if column.metric else task_score
                expected = expected_score(table2, row.label, table2.task_of(column), 0, metric)
            if expected is None:
                assert pd.isna(cell["value"]) and pd.isna(cell["delta"])
                assert shown.loc[row.label, f"{column.label} (ours)"] == "—"
                continue
            assert cell["value"] == pytest.approx(expected, abs=1e-9)
            if paper is None:
                assert pd.isna(cell["delta"])
            else:
                assert cell["delta"] == pytest.approx(expected - paper, abs=1e-9)
    assert shown.loc["Base", "%Param (paper)"] == "—"
    assert shown.loc["HydraLoRA (r=8, N=auto)", "HumanEval P@1 (paper)"] == "18.31"


def test_one_seed_shows_lm_eval_stderr_and_sample_count(store: RunStore,
                                                        table2: TableSpec) -> None:
    from hydrabench.reports.cells import collect_cells

    fill(store, table2)
    cells = {(c.row, c.column): c for c in collect_cells(table2, PROFILE, (0,), store)}
    general = cells[("LoRA (r=8)", "MMLU")]
    k = len(eval_tasks("general"))
    assert general.stderr == pytest.approx(100 * math.sqrt(k * STDERR**2) / k)
    assert general.n == k * N_PER_TASK and general.ci95 is None
    assert general.run_ids == [next(s.run_id for r, t, s in table_runs(table2, PROFILE)
                                    if r.label == "LoRA (r=8)" and t == "general")]


def test_nothing_is_bold_without_per_item_outputs(store: RunStore, table2: TableSpec,
                                                  tmp_path: Path) -> None:
    # These records have no lm-eval per-sample outputs: no paired test, so no bold (the rule
    # is tested with planted outcomes in test_bold_only_for_a_paired_win).
    fill(store, table2)
    md, _, tex, _ = write_table_report(table2, PROFILE, (0,), store, tmp_path)
    shown = markdown_table(md.read_text()).set_index("Method")
    for column in table2.columns:
        assert not shown[f"{column.label} (ours)"].str.startswith("**").any(), column.label
    one = expected_score(table2, "LoRA (r=8)", "general", 0)
    spread = _stderr_for(table2, table2.columns[0])
    assert shown.loc["LoRA (r=8)", "MMLU (ours)"] == f"{one:.2f} ± {spread:.2f}"
    assert "McNemar's exact test" in md.read_text() and "McNemar" in tex.read_text()


def _stderr_for(table: TableSpec, column: Column) -> float:
    """The stderr a one-seed cell shows: lm-eval stderrs combined over the column's tasks."""
    k = len(eval_tasks(table.task_of(column)))
    return 100 * math.sqrt(k * STDERR**2) / k


def test_csv_round_trip_equals_cells(store: RunStore, table2: TableSpec, tmp_path: Path) -> None:
    from hydrabench.reports.cells import collect_cells
    from hydrabench.reports.tables import tidy_frame

    fill(store, table2)
    raw = write_table_report(table2, PROFILE, (0,), store, tmp_path)[3]
    back = pd.read_csv(raw, keep_default_na=False,
                       na_values=[""])
    direct = tidy_frame(collect_cells(table2, PROFILE, (0,), store))
    assert list(back.columns) == ["row", "column", "paper_column", "value", "stderr", "ci95",
                                  "n", "n_seeds",
                                  "paper_value", "delta", "run_id", "ci_low", "ci_high",
                                  "stand_in", "data_source", "bold", "p_vs_runner_up",
                                  "delta_vs_ref", "delta_vs_ref_low", "delta_vs_ref_high",
                                  "hardware"]
    numeric = ["value", "stderr", "ci95", "n", "n_seeds", "paper_value", "delta", "ci_low",
               "ci_high", "p_vs_runner_up", "delta_vs_ref"]
    pd.testing.assert_frame_equal(back[numeric].astype(float), direct[numeric].astype(float))
    assert back["row"].tolist() == direct["row"].tolist()
    assert back["run_id"].fillna("").tolist() == direct["run_id"].tolist()


def test_metric_key_matches_name_or_exact_key() -> None:
    task = TaskMetrics(value=0.1, primary="pass@1,create_test", n=10, stderr={},
                       metrics={"pass@1,create_test": 0.1, "pass@10,create_test": 0.2,
                                "pass@100,create_test": 0.3})
    assert task.key(None) == "pass@1,create_test"
    assert task.key("pass@10") == "pass@10,create_test"
    assert task.key("pass@100,create_test") == "pass@100,create_test"
    assert task.key("pass@5") is None


# -- seeds -------------------------------------------------------------------------------------


def test_three_seeds_give_mean_and_t_interval(store: RunStore, tmp_path: Path) -> None:
    table = load_table("table1")
    seeds = (0, 1, 2)
    # LoRA-Split (16×2) misses seed 2: its cell averages the two seeds it has.
    fill(store, table, seeds, skip={("LoRA-Split (16×2)", 2)})
    md, _, tex, raw = write_table_report(table, PROFILE, seeds, store, tmp_path)
    tidy = pd.read_csv(raw).set_index(["row", "column"])
    shown = markdown_table(md.read_text()).set_index("Method")
    for label, have in (("LoRA (r=16)", seeds), ("LoRA-Split (16×2)", (0, 1))):
        values = [expected_score(table, label, "general", s) for s in have]
        mean = sum(values) / len(values)
        low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
        cell = tidy.loc[(label, "MMLU")]
        assert cell["value"] == pytest.approx(mean)
        assert cell["ci95"] == pytest.approx((high - low) / 2)
        assert cell["stderr"] == pytest.approx(stats.sem(values))
        assert cell["n_seeds"] == len(have) and len(cell["run_id"].split(";")) == len(have)
        partial = "†" if len(have) < len(seeds) else ""
        assert shown.loc[label, "MMLU (ours)"].strip("*") == (
            f"{mean:.2f} ± {(high - low) / 2:.2f}{partial}")
    assert "seeds: 0, 1, 2" in md.read_text()
    assert r"$\pm$" in tex.read_text() and r"\dag" in tex.read_text()


def test_mean_ci_of_one_value_has_no_spread() -> None:
    assert mean_ci([42.0]) == (42.0, None, None)
    mean, sem, ci = mean_ci([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and sem == pytest.approx(stats.sem([1.0, 2.0, 4.0]))
    assert ci == pytest.approx(stats.t.ppf(0.975, 2) * sem)


# -- LaTeX -------------------------------------------------------------------------------------


def _columns_spanned(row: str) -> int:
    """Columns a tabular row covers: cells, with \\multicolumn{n} counted as n."""
    cells = re.split(r"(?<!\\)&", row)
    return sum(int(m.group(1)) if (m := re.search(r"\\multicolumn\{(\d+)\}", c)) else 1
               for c in cells)


def tabular_rows(tex: str) -> list[str]:
    body = tex.split(r"\toprule")[1].split(r"\bottomrule")[0]
    return [line for line in body.splitlines() if line.rstrip().endswith(r"\\")]


def test_latex_is_booktabs_rectangular_and_escaped(store: RunStore, table2: TableSpec,
                                                   tmp_path: Path) -> None:
    fill(store, table2)
    tex = write_table_report(table2, PROFILE, (0,), store, tmp_path)[2].read_text()
    assert tex.startswith("% hydrabench report table2")
    assert r"% requires \usepackage{booktabs}" in tex
    tex = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 1, rule
    rows = tabular_rows(tex)
    width = 1 + 2 * len(table2.columns)
    assert len(rows) == 2 + len(table2.rows)  # two header rows, then one per method
    assert {_columns_spanned(r) for r in rows} == {width}
    # The body rows, without \multicolumn, have exactly width - 1 separators each.
    assert {len(re.findall(r"(?<!\\)&", r)) for r in rows[2:]} == {width - 1}
    assert re.search(r"\\begin\{tabular\}\{l(rr){7}\}", tex)
    assert r"\%Param" in tex and r"LoRA-Split (4$\times$8)" in tex
    assert r"(IA)\textsuperscript{3}" in tex and r"$\pm$" in tex and "---" in tex
    assert not re.search(r"(?<!\\)[%#_]", tex.replace(r"\label{tab:table2}", ""))
    assert not re.search(r"[^\x00-\x7f]", tex)  # pdflatex needs no Unicode set-up


def test_latex_escape_covers_specials() -> None:
    assert latex_escape("R&D_1 50% #2 $3 {x} ~^\\") == (
        r"R\&D\_1 50\% \#2 \$3 \{x\} \textasciitilde{}\textasciicircum{}\textbackslash{}")


@pytest.mark.skipif(not shutil.which("pdflatex"), reason="no pdflatex (TeX not installed)")
def test_latex_compiles_with_only_booktabs(store: RunStore, tmp_path: Path) -> None:
    inputs = []
    for name in ("table1", "table2", "table3", "figure6"):
        table = load_table(name)
        fill(store, table, (0, 1))
        inputs.append(write_table_report(table, PROFILE, (0, 1), store, tmp_path)[2].name)
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                   + "".join(f"\\input{{{name}}}\n" for name in inputs) + "\\end{document}\n")
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-3000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 0


# -- figures -----------------------------------------------------------------------------------


def _nonempty(path: Path, magic: bytes) -> None:
    assert path.exists() and path.stat().st_size > 1000 and path.read_bytes().startswith(magic)


def test_figure5_numbers_sources_and_missing_bars(store: RunStore, tmp_path: Path) -> None:
    table = load_table("figure5")
    cost = {"LoRA (r=8)": (2e-4, 30.0, True), "LoRA (r=16)": (3e-4, 40.0, False),
            "LoRA-Split (4×8)": (None, 80.0, False),
            "HydraLoRA (r=8, N=auto)": (2.5e-4, 35.0, True)}
    for row, _, spec in table_runs(table, PROFILE):
        if row.label in cost:  # LoRA (r=32) gets no record
            kwh, wall_s, measured = cost[row.label]
            write_json_atomic(store.record_path(spec.run_id), make_record(
                spec, 0, metering=train_metering(kwh, wall_s, measured)))
    paths = write_figure5(table, PROFILE, (0,), store, tmp_path)
    assert [p.suffix for p in paths] == [".png", ".pdf", ".csv", ".md"]
    _nonempty(paths[0], b"\x89PNG")
    _nonempty(paths[1], b"%PDF")
    frame = pd.read_csv(paths[2]).set_index("method")
    for label, (kwh, wall_s, measured) in cost.items():
        row = frame.loc[label]
        assert (row["energy_kwh"] == kwh) if kwh is not None else pd.isna(row["energy_kwh"])
        assert row["train_wall_s"] == wall_s and row["n_seeds"] == 1
        assert row["tokens_per_s"] == pytest.approx(1000.0 / wall_s)
        assert row["energy_source"] == ("unavailable" if kwh is None
                                        else "measured" if measured else "estimated")
    assert "cpu=estimated:codecarbon" in frame.loc["LoRA (r=16)", "energy_components"]
    assert frame.loc["LoRA-Split (4×8)", "note"] == "energy unavailable"
    missing = frame.loc["LoRA (r=32)"]
    assert missing["note"] == "no record" and missing["n_seeds"] == 0
    assert pd.isna(missing["energy_kwh"]) and pd.isna(missing["train_wall_s"])
    text = paths[3].read_text()
    assert "figure5.png" in text and "builtin:tiny" in text and "1.96×" in text


def test_figure5_mixed_seeds_count_as_estimated(store: RunStore, tmp_path: Path) -> None:
    table = load_table("figure5")
    for _, _, spec in table_runs(table, PROFILE, (0, 1)):
        measured = spec.seed == 0
        write_json_atomic(store.record_path(spec.run_id), make_record(
            spec, 0, metering=train_metering(1e-4 * (1 + spec.seed), 10.0 + spec.seed, measured)))
    frame = pd.read_csv(write_figure5(table, PROFILE, (0, 1), store, tmp_path)[2])
    assert set(frame["energy_source"]) == {"estimated"}
    assert frame["energy_kwh"].tolist() == pytest.approx([1.5e-4] * len(frame))
    assert frame["train_wall_ci95"].tolist() == pytest.approx(
        [stats.t.ppf(0.975, 1) * stats.sem([10.0, 11.0])] * len(frame))


def test_figure5_reuses_table2_runs() -> None:
    def run_ids(name: str) -> set[str]:
        return {spec.run_id for _, _, spec in table_runs(load_table(name), PROFILE)}

    assert run_ids("figure5") <= run_ids("table2")


def test_figure6_files_and_numbers(store: RunStore, tmp_path: Path) -> None:
    table = load_table("figure6")
    fill(store, table, skip={("w/o gate (uniform)", 0)})
    paths = {p.suffix: p for p in write_figure6(table, PROFILE, (0,), store, tmp_path)}
    assert set(paths) == {".md", ".csv", ".tex", ".png", ".pdf"}
    _nonempty(paths[".png"], b"\x89PNG")
    _nonempty(paths[".pdf"], b"%PDF")
    tidy = pd.read_csv(paths[".csv"]).set_index(["row", "column"])
    assert tidy.loc[("HydraLoRA", "Law"), "value"] == pytest.approx(
        expected_score(table, "HydraLoRA", "law", 0))
    assert tidy.loc[("HydraLoRA", "Law"), "paper_value"] == 42.18
    assert pd.isna(tidy.loc[("w/o gate (uniform)", "MMLU"), "value"])


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_report_all_writes_every_report(store_env: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # Figures refuse to plot nothing: Figure 5's runs (Table 2's) get records with a metering.
    for _, _, spec in table_runs(load_table("figure5"), PROFILE, (0, 1)):
        write_json_atomic(RunStore().record_path(spec.run_id), make_record(
            spec, 0, metering=train_metering(1e-4, 10.0, False)))
    fill(RunStore(), load_table("figure6"), (0, 1))  # and Figure 6 scores
    assert main(["report", "all", "--seeds", "0,1"]) == 0
    printed = capsys.readouterr().out.split()
    reports = store_env / "reports"
    expected = {f"{name}.{ext}" for name in ("table1", "table2", "table3", "successors", "heads")
                for ext in ("md", "csv", "tex", "raw.csv")}
    expected |= {f"figure5.{ext}" for ext in ("png", "pdf", "csv", "md")}
    expected |= {f"figure6.{ext}" for ext in ("md", "csv", "tex", "raw.csv", "png", "pdf")}
    assert {p.name for p in reports.iterdir() if not p.name.startswith(".")} == expected
    assert sorted(Path(p).name for p in printed) == sorted(expected)
    assert "Runs: none" in (reports / "table3.md").read_text()


def test_cli_report_all_skips_figures_without_records_and_writes_the_tables(
        store_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "all"]) == 0
    captured = capsys.readouterr()
    written = {p.name for p in (store_env / "reports").iterdir()}
    assert {"table1.md", "table2.csv", "table3.tex"} <= written
    assert not any(name.startswith("figure5") for name in written)
    assert "hydrabench: skipped figure5: no trained run records" in captured.err
    assert main(["report", "figure5"]) == 2  # asked for alone, it is the one-line refusal


def test_reproduce_runs_every_row_and_code_only_when_approved(store_env: Path) -> None:
    # A stand-in for runner.execute, passed to the sweep as `reproduce` passes the real one:
    # this checks what reproduce asks to run, fast (resolution checks method names for real).
    executed: list[RunSpec] = []

    def execute(spec: RunSpec) -> RunRecord:
        """Like the runner: a finished record is returned, not rerun."""
        store = RunStore()
        if not store.has(spec.run_id):
            executed.append(spec)
            write_json_atomic(store.record_path(spec.run_id), make_record(spec, 0))
        return store.load(spec.run_id)

    def reproduce(allow_code_execution: bool) -> None:
        """`hydrabench reproduce table2` with this execute."""
        plan_sweep(load_table("table2"), PROFILE, (0,), execute,
                   allow_code_execution=allow_code_execution).run_local()
        write_report("table2", PROFILE)

    table = load_table("table2")
    runs = [spec for _, _, spec in table_runs(table, PROFILE)]
    code = {spec.run_id for spec in runs if spec.task in ("code", "code_p10")}
    assert code and all(s.eval.allow_code_execution == (s.run_id in code) for s in runs)

    reproduce(allow_code_execution=False)
    assert [s.run_id for s in executed] == [s.run_id for s in runs if s.run_id not in code]
    tidy = pd.read_csv(store_env / "reports" / "table2.csv")
    # Every row: its 4 scores outside HumanEval and its %Param (Base's too, in these records).
    assert tidy["value"].notna().sum() == len(table.rows) * (4 + 1)

    executed.clear()
    reproduce(allow_code_execution=True)
    assert {s.run_id for s in executed} == code


def test_cli_report_unknown_table_is_a_one_line_error(store_env: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "tabel2"]) == 2
    assert "did you mean 'table2'" in capsys.readouterr().err


# -- paired significance, intervals, labels ----------------------------------------------------


N_ITEMS = 60


def write_scored(store: RunStore, spec: RunSpec, right: dict[str, int],
                 labels: dict[str, Any] | None = None) -> None:
    """A record and lm-eval per-sample outputs in which the first right[task] items of each
    task are answered correctly (so runs nest: a better one is right wherever a worse one is)."""
    metrics = {}
    lm_eval = store.runs / spec.run_id / "lm_eval"
    lm_eval.mkdir(parents=True, exist_ok=True)
    for task in spec.eval_tasks:
        outcomes = [1.0 if i < right[task] else 0.0 for i in range(N_ITEMS)]
        acc = sum(outcomes) / N_ITEMS
        metrics[task] = {"metrics": {"acc,none": acc}, "stderr": {"acc,none": 0.05},
                         "primary": "acc,none", "value": acc, "n": N_ITEMS}
        (lm_eval / f"samples_{task}.jsonl").write_text("".join(
            json.dumps({"doc_id": i, "doc_hash": f"doc{i}", "filter": "none", "acc": o}) + "\n"
            for i, o in enumerate(outcomes)))
    write_json_atomic(store.record_path(spec.run_id), {
        "run_id": spec.run_id, "method": spec.method, "task": spec.task, "seed": spec.seed,
        "metrics": metrics, "column_tasks": list(spec.eval_tasks),
        "training": {"trained": True, "parameters": {"percent_param": 0.1}}, **(labels or {})})


def fill_scored(store: RunStore, table: TableSpec, right_by_row: dict[str, int],
                seeds: tuple[int, ...] = (0,), per_seed: int = 0,
                labels: dict[str, Any] | None = None) -> None:
    """Records for the rows named: right_by_row[label] (+ per_seed × seed) right per task."""
    for row, _, spec in table_runs(table, PROFILE, seeds):
        if row.label in right_by_row:
            right = right_by_row[row.label] + per_seed * spec.seed
            write_scored(store, spec, dict.fromkeys(spec.eval_tasks, right), labels)


def _bold_rows(md: Path, column: str = "MMLU (ours)") -> list[str]:
    shown = markdown_table(md.read_text()).set_index("Method")
    return [label for label, text in shown[column].items() if text.startswith("**")]


def test_bold_only_for_a_paired_win(store: RunStore, tmp_path: Path) -> None:
    table = load_table("table1")
    k = len(eval_tasks("general"))
    # HydraLoRA right on 10 more items per task than LoRA r=32: a significant paired win.
    fill_scored(store, table, {"LoRA (r=8)": 20, "LoRA (r=32)": 30, "HydraLoRA (r=8, N=4)": 40})
    md, csv, tex, _ = write_table_report(table, PROFILE, (0,), store, tmp_path / "win")
    assert _bold_rows(md) == ["HydraLoRA (r=8, N=4)"]
    tidy = pd.read_csv(csv).set_index(["row", "column"])
    p = tidy.loc[("HydraLoRA (r=8, N=4)", "MMLU"), "p_vs_runner_up"]
    assert p == pytest.approx(stats.binomtest(10 * k, 10 * k).pvalue)
    assert "McNemar" in md.read_text() and "McNemar" in tex.read_text()
    assert re.search(r"\\textbf\{", tex.read_text())

    # One more item per task than the runner-up: within noise, so nothing is bold.
    fill_scored(store, table, {"LoRA (r=32)": 39})
    md, csv, _, _ = write_table_report(table, PROFILE, (0,), store, tmp_path / "close")
    assert _bold_rows(md) == []
    assert pd.read_csv(csv).set_index(["row", "column"]).loc[
        ("HydraLoRA (r=8, N=4)", "MMLU"), "p_vs_runner_up"] == pytest.approx(
            stats.binomtest(k, k).pvalue)

    # A tie at the top (here at 0.00): never bold, let alone twice.
    fill_scored(store, table, {"LoRA (r=8)": 0, "LoRA (r=32)": 0, "HydraLoRA (r=8, N=4)": 0})
    md, *_ = write_table_report(table, PROFILE, (0,), store, tmp_path / "tie")
    assert _bold_rows(md) == []


def test_two_seeds_pool_pairs_clip_intervals_and_delta_vs_reference(store: RunStore,
                                                                    tmp_path: Path) -> None:
    table = load_table("table1")
    seeds = (0, 1)
    k = len(eval_tasks("general"))
    # Per seed: LoRA r=8 right on 0 then 50 items per task (a huge seed spread around 41.67);
    # HydraLoRA on 10 then 60, so +10 items per task and seed over LoRA r=8.
    fill_scored(store, table, {"LoRA (r=8)": 0, "HydraLoRA (r=8, N=4)": 10}, seeds,
                per_seed=50)
    md, _, tex, raw = write_table_report(table, PROFILE, seeds, store, tmp_path,
                                         reference="LoRA (r=8)")
    tidy = pd.read_csv(raw).set_index(["row", "column"])
    lora, hydra = tidy.loc[("LoRA (r=8)", "MMLU")], tidy.loc[("HydraLoRA (r=8, N=4)", "MMLU")]
    values = [0.0, 100 * 50 / N_ITEMS]
    low, high = stats.t.interval(0.95, 1, loc=sum(values) / 2, scale=stats.sem(values))
    assert low < 0 < 100 < high and (lora["ci_low"], lora["ci_high"]) == (0.0, 100.0)
    shown = markdown_table(md.read_text()).set_index("Method")
    assert shown.loc["LoRA (r=8)", "MMLU (ours)"] == f"{sum(values) / 2:.2f} [0.00, 100.00]"
    # The discordant pairs of both seeds pooled: 2 seeds × 10 items × k tasks, all HydraLoRA's.
    assert hydra["p_vs_runner_up"] == pytest.approx(stats.binomtest(20 * k, 20 * k).pvalue)
    assert _bold_rows(md) == ["HydraLoRA (r=8, N=4)"]
    delta_column = "MMLU Δ vs LoRA (r=8) [95% CI]"
    assert hydra["delta_vs_ref"] == pytest.approx(100 * 10 / N_ITEMS)
    low, high = hydra["delta_vs_ref_low"], hydra["delta_vs_ref_high"]
    assert 0 < low < hydra["delta_vs_ref"] < high
    assert shown.loc["HydraLoRA (r=8, N=4)", delta_column] == f"+16.67 [{low:+.2f}, {high:+.2f}]"
    assert shown.loc["LoRA (r=16)", delta_column] == "—"
    assert "Δ vs LoRA (r=8)" in md.read_text().split("|")[0]  # the legend says what Δ is
    rows = tabular_rows(tex.read_text())
    assert {_columns_spanned(r) for r in rows} == {1 + 3 + 2}


def test_labels_come_from_the_records(store: RunStore, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    table = load_table("table1")
    synthetic = {"stand_in": True, "data_source": "train: synthetic suite (generated); "
                                                  "eval: synthetic suite (generated)"}
    fill_scored(store, table, {"LoRA (r=8)": 20}, labels=synthetic)
    # What the environment says at report time changes nothing.
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(tmp_path / "elsewhere"))
    md, csv, tex, _ = write_table_report(table, PROFILE, (0,), store, tmp_path)
    text = md.read_text()
    assert "stand-in tasks (their records say so)" in text
    assert synthetic["data_source"] in text and "elsewhere" not in text
    assert "general (stand-in for MMLU) (ours)" in text
    tidy = pd.read_csv(csv)
    filled = tidy[tidy["run_id"].notna()]
    assert filled["stand_in"].all() and (filled["data_source"] == synthetic["data_source"]).all()
    assert "Stand-in tasks" in tex.read_text() and "general (stand-in for MMLU)" in tex.read_text()

    real = {"stand_in": False, "data_source": "train: local copy d/x.json; eval: local copies in d"}
    fill_scored(store, table, {"LoRA (r=8)": 20}, labels=real)
    md, csv, tex, _ = write_table_report(table, PROFILE, (0,), store, tmp_path / "real")
    assert "their records say so" not in md.read_text() and "Stand-in" not in tex.read_text()
    assert "(stand-in for" not in md.read_text() + tex.read_text()
    assert not pd.read_csv(csv)["stand_in"].dropna().astype(bool).any()


def test_rows_with_different_specs_never_share_a_label() -> None:
    for profile in ("tiny", "paper"):
        specs: dict[str, set[tuple[str, str]]] = {}
        for name in ("table1", "table2", "table3", "figure5", "figure6"):
            for row, _, spec in table_runs(load_table(name), profile):
                specs.setdefault(row.label, set()).add((spec.method, repr(spec.adapter)))
        shared = {label: ids for label, ids in specs.items() if len(ids) > 1}
        assert not shared, (profile, shared)


def test_a_profile_extending_tiny_is_labelled_a_stand_in(store_env: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    # A real run (the untrained base model: nothing to train) under a user's profile file.
    profile = store_env / "mine.yaml"
    profile.write_text("extends: tiny\ndescription: my own profile\n")
    assert main(["run", "--profile", str(profile), "--method", "base", "--task", "medical"]) == 0
    (record,) = RunStore().records()
    assert record.stand_in is True and "synthetic suite" in record.data_source
    assert main(["report", "table2", "--profile", str(profile)]) == 0
    reports = store_env / "reports"
    md = (reports / "table2.md").read_text()
    assert "stand-in tasks (their records say so)" in md and "Hugging Face hub" not in md
    assert "medical (stand-in for Medical) (ours)" in md
    tidy = pd.read_csv(reports / "table2.csv").set_index(["row", "paper_column"])
    assert bool(tidy.loc[("Base", "Medical"), "stand_in"]) is True
    tex = (reports / "table2.tex").read_text()
    assert "Stand-in tasks" in tex and "medical (stand-in for Medical)" in tex
