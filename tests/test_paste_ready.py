"""Issue 31: output a researcher can paste and trust (tables, record display, --task).

Records are written by hand at the run ids the table specs imply (as in test_report.py): every
expected number is known by construction; nothing is trained or evaluated.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_report import (
    N_ITEMS,
    PROFILE,
    STAND_IN,
    eval_tasks,
    fill,
    fill_scored,
    make_record,
    markdown_table,
)

from hydrabench.atomic import write_json_atomic
from hydrabench.cli import main
from hydrabench.config.tables import load_table
from hydrabench.evaluation import significance
from hydrabench.pipeline.resolve import table_runs
from hydrabench.records.store import RunStore
from hydrabench.reports.tables import write_table_report

# -- 1. paper-ready tables ---------------------------------------------------------------------


def test_stand_in_table_says_so_in_title_csv_and_caption(store: RunStore, tmp_path: Path) -> None:
    table = load_table("table1")
    fill_scored(store, table, {"LoRA (r=8)": 20}, labels=STAND_IN)
    md, csv, tex, raw = write_table_report(table, PROFILE, (0,), store, tmp_path)
    title = md.read_text().splitlines()[0]
    assert title == ("# Table 1: LoRA vs LoRA-Split (general instruction tuning, scored on "
                     "general (stand-in for MMLU))")
    for path in (csv, raw):
        frame = pd.read_csv(path)
        assert "MMLU" not in set(frame["column"])
        assert set(frame.loc[frame["paper_column"] == "MMLU", "column"]) == {
            "general (stand-in for MMLU)"}
        assert set(frame.loc[frame["paper_column"] == "%Param", "column"]) == {"%Param"}
    caption = re.search(r"\\caption\{(.*)\}", tex.read_text()).group(1)
    assert "scored on general (stand-in for MMLU)" in caption


def test_title_without_a_column_label_is_marked(store: RunStore, tmp_path: Path) -> None:
    table = load_table("table2")  # "PEFT methods on single domains": names no column
    fill_scored(store, table, {"LoRA (r=8)": 20}, labels=STAND_IN)
    md = write_table_report(table, PROFILE, (0,), store, tmp_path)[0]
    assert md.read_text().startswith("# Table 2: PEFT methods on single domains (stand-in tasks)")


def test_csv_is_rounded_and_raw_csv_keeps_full_precision(store: RunStore,
                                                          tmp_path: Path) -> None:
    table = load_table("table1")
    fill(store, table)
    _, csv, _, raw = write_table_report(table, PROFILE, (0,), store, tmp_path)
    rounded, full = pd.read_csv(csv), pd.read_csv(raw)
    score = full["paper_column"] == "MMLU"
    values = full.loc[score, "value"].dropna()
    # The hand-made scores (e.g. 100 × 0.2xx averaged over tasks) are not 2-decimal numbers.
    assert any(round(v, 2) != v for v in values)
    assert rounded.loc[score, "value"].dropna().tolist() == [round(v, 2) for v in values]
    for column in ("value", "stderr", "paper_value", "delta"):
        texts = re.findall(r"\d+\.\d+", rounded.loc[score, column].dropna().to_csv(index=False))
        assert all(len(t.split(".")[1]) <= 2 for t in texts), column
    param = full["paper_column"] == "%Param"
    assert rounded.loc[param, "value"].dropna().tolist() == [
        float(f"{v:.4g}") for v in full.loc[param, "value"].dropna()]
    assert "35.99999" not in csv.read_text()


def _compile(tmp_path: Path, inputs: list[str]) -> subprocess.CompletedProcess[str]:
    """The fragments \\input in a minimal article that loads booktabs only."""
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                   + "".join(f"\\input{{{name}}}\n" for name in inputs) + "\\end{document}\n")
    return subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_tex_has_one_title_and_names_booktabs(store: RunStore, tmp_path: Path) -> None:
    table = load_table("table1")
    fill_scored(store, table, {"LoRA (r=8)": 20}, labels=STAND_IN)
    tex = write_table_report(table, PROFILE, (0,), store, tmp_path)[2].read_text()
    assert tex.splitlines()[1] == r"% requires \usepackage{booktabs}"
    caption = re.search(r"\\caption\{(.*)\}", tex).group(1)
    # LaTeX prints "Table 1:" itself: the caption must not say it again.
    assert not re.match(r"(Table|Fig)", caption) and caption.startswith("LoRA vs LoRA-Split")
    assert r"$\pm$ is lm-eval's standard error" in caption
    if shutil.which("pdflatex"):
        result = _compile(tmp_path, ["table1.tex"])
        assert result.returncode == 0, result.stdout[-3000:]
        text = subprocess.run(["pdftotext", "doc.pdf", "-"], cwd=tmp_path, capture_output=True,
                              text=True).stdout if shutil.which("pdftotext") else ""
        assert "Table 1: Table 1" not in text


def test_plus_minus_has_one_meaning_per_table(store: RunStore, tmp_path: Path) -> None:
    table = load_table("table1")
    seeds = (0, 1, 2)
    # LoRA-Split (16×2) has seed 0 only: in a 3-seed table its cell shows no stderr as "±".
    fill(store, table, seeds, skip={("LoRA-Split (16×2)", 1), ("LoRA-Split (16×2)", 2)})
    md, _, tex, raw = write_table_report(table, PROFILE, seeds, store, tmp_path)
    shown = markdown_table(md.read_text()).set_index("Method")
    full = pd.read_csv(raw).set_index(["row", "paper_column"])
    one = full.loc[("LoRA-Split (16×2)", "MMLU")]
    assert one["n_seeds"] == 1 and shown.loc["LoRA-Split (16×2)", "MMLU (ours)"] == (
        f"{one['value']:.2f}†")
    three = full.loc[("LoRA (r=8)", "MMLU")]
    assert shown.loc["LoRA (r=8)", "MMLU (ours)"] == f"{three['value']:.2f} ± {three['ci95']:.2f}"
    text = md.read_text()
    assert "± is the half-width of the 95% t-interval over the 3 seeds" in text
    assert "stderr (one seed) or the 95% CI" not in text
    assert "95\\% t-interval over the 3 seeds" in tex.read_text()

    md = write_table_report(table, PROFILE, (0,), store, tmp_path / "one")[0]
    assert "± is lm-eval's standard error" in md.read_text()


def test_report_without_seeds_uses_the_records_seeds(store_env: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    table = load_table("table1")
    fill(RunStore(), table, (0, 1, 2))
    assert main(["report", "table1"]) == 0
    md = (store_env / "reports" / "table1.md").read_text()
    assert "seeds: 0, 1, 2 (every seed the records have)" in md
    assert pd.read_csv(store_env / "reports" / "table1.csv")["n_seeds"].max() == 3
    capsys.readouterr()

    # Asking for fewer seeds than the records have is done, and said (report and stderr).
    assert main(["report", "table1", "--seeds", "0"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"table1: seeds 0 as --seeds asked; records of seed\(s\) 1, 2 exist", err)
    assert "records of seed(s) 1, 2 exist and are left out" in (
        store_env / "reports" / "table1.md").read_text()


# -- 2. hardware ---------------------------------------------------------------------------------


def hardware(cpu: str, threads: int) -> dict[str, Any]:
    """metering.hardware_summary's fields that reports name."""
    return {"cpu_model": cpu, "logical_cores": 2, "torch_threads": threads,
            "torch_interop_threads": 1, "omp_num_threads": str(threads), "mkl_num_threads": None,
            "blas": "mkl", "gpus": []}


def with_provenance(record: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    return {**record, "provenance": {"model_source": "builtin:tiny", "data_fingerprints": {},
                                     "data_source": "local", "packages": {}, "python": "3.11",
                                     "hardware": machine}}


def _fill_on(store: RunStore, machine_of: dict[str, dict[str, Any]]) -> Path:
    table = load_table("table1")
    for index, (row, _, spec) in enumerate(table_runs(table, PROFILE)):
        if row.label in machine_of:
            write_json_atomic(store.record_path(spec.run_id),
                              with_provenance(make_record(spec, index), machine_of[row.label]))
    return table


def test_report_names_the_hardware(store: RunStore, tmp_path: Path) -> None:
    xeon = hardware("Intel(R) Xeon(R) CPU @ 2.20GHz", 2)
    table = _fill_on(store, {"LoRA (r=8)": xeon, "LoRA (r=16)": xeon})
    paths = write_table_report(table, PROFILE, (0,), store, tmp_path)
    md, tex = paths[0], paths[2]
    lines = [line for line in md.read_text().splitlines() if "hardware" in line.lower()]
    assert lines == ["- hardware, as the records state it: Intel(R) Xeon(R) CPU @ 2.20GHz "
                     "(2 logical cores); torch threads 2 intra-op / 1 inter-op; OMP_NUM_THREADS "
                     "2, MKL_NUM_THREADS unset; BLAS mkl; no GPU"]
    assert "Intel(R) Xeon(R) CPU @ 2.20GHz" in tex.read_text()


def test_mixed_hardware_is_said_in_one_line(store: RunStore, tmp_path: Path) -> None:
    table = _fill_on(store, {"LoRA (r=8)": hardware("Intel Xeon", 2),
                             "LoRA (r=16)": hardware("Intel Xeon", 8),
                             "LoRA (r=32)": hardware("AMD EPYC 7B13", 2)})
    md = write_table_report(table, PROFILE, (0,), store, tmp_path)[0].read_text()
    lines = [line for line in md.splitlines() if "hardware" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith(
        "- **mixed hardware: these records come from 3 different machines or thread settings")
    assert "AMD EPYC 7B13" in lines[0] and "torch threads 8 intra-op" in lines[0]


# -- 3. Δ over seeds and items ---------------------------------------------------------------------


def test_seeds_and_items_interval_by_hand() -> None:
    # Two seeds, one task, four items. Differences per seed: [1,0,0,0] and [1,1,1,0].
    a = [np.array([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=float)]
    b = [np.array([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=float)]
    got = significance.seeds_and_items_interval(a, b)
    # d_s = 0.25, 0.75: mean 0.5; var over seeds (0.125) / 2 seeds = 0.0625.
    # Items averaged over seeds: 1, .5, .5, 0 (mean .5): var 0.5/3, over 4 items = 1/24.
    assert got.delta == 0.5
    assert got.var_seeds == pytest.approx(0.0625) and got.var_items == pytest.approx(1 / 24)
    se2 = 0.0625 + 1 / 24
    df = se2**2 / (0.0625**2 / 1 + (1 / 24) ** 2 / 3)
    assert got.df == pytest.approx(df) and got.df == pytest.approx(2.4194, abs=1e-4)
    half = stats.t.ppf(0.975, df) * math.sqrt(se2)
    assert (got.low, got.high) == pytest.approx((0.5 - half, 0.5 + half))
    result = significance.paired_comparison(a, b)
    assert result.interval == "seeds+items" and result.df == pytest.approx(df)
    assert result.se == pytest.approx(100 * math.sqrt(se2))
    assert (result.ci_low, result.ci_high) == pytest.approx((100 * (0.5 - half),
                                                             100 * (0.5 + half)))
    # One seed keeps the paired bootstrap over items.
    assert significance.paired_comparison([a[0][:1]], [b[0][:1]]).interval == "items"


def test_table_delta_counts_the_seed_to_seed_spread(store: RunStore, tmp_path: Path) -> None:
    table = load_table("table1")
    seeds = (0, 1, 2)
    # LoRA r=8 right on 20 items per task every seed; HydraLoRA on 20, 35, 50: Δ 0, 25, 50 points.
    fill_scored(store, table, {"LoRA (r=8)": 20}, seeds)
    fill_scored(store, table, {"HydraLoRA (r=8, N=4)": 20}, seeds, per_seed=15)
    md, _, _, raw = write_table_report(table, PROFILE, seeds, store, tmp_path,
                                       reference="LoRA (r=8)")
    cell = pd.read_csv(raw).set_index(["row", "column"]).loc[("HydraLoRA (r=8, N=4)", "MMLU")]
    # By hand: k identical tasks; d_s = 0, .25, .5; items averaged over seeds: 20 at 0, 15 at
    # 2/3, 15 at 1/3, 10 at 0.
    k = len(eval_tasks("general"))
    var_seeds = np.var([0, 0.25, 0.5], ddof=1) / 3
    m = np.array([0] * 20 + [2 / 3] * 15 + [1 / 3] * 15 + [0] * 10)
    part = m.var(ddof=1) / N_ITEMS / k**2
    var_items = k * part
    df = (var_seeds + var_items) ** 2 / (var_seeds**2 / 2 + k * part**2 / (N_ITEMS - 1))
    half = 100 * stats.t.ppf(0.975, df) * math.sqrt(var_seeds + var_items)
    assert cell["delta_vs_ref"] == pytest.approx(25.0)
    assert (cell["delta_vs_ref_low"], cell["delta_vs_ref_high"]) == pytest.approx(
        (25 - half, 25 + half))
    # Three seeds this far apart cannot exclude 0 (the items alone would: ±~8 points).
    assert cell["delta_vs_ref_low"] < 0 < cell["delta_vs_ref_high"]
    assert "t-interval over seeds and items" in md.read_text()


# -- 4. list runs and show --------------------------------------------------------------------


def _lora_record(rank: int, steps: int, max_steps: int = 0, method: str = "lora",
                 limit: int | None = None) -> dict[str, Any]:
    run_id = f"{method}-general-s0-r{rank}-m{max_steps}"
    spec = {"profile": "tiny", "model": "builtin:tiny",
            "adapter": {"rank": rank, "alpha": 32.0, "num_heads": 4, "num_splits": 4,
                        "target_modules": ["q_proj", "v_proj"]},
            "train": {"lr": 2e-4, "max_steps": max_steps, "batch_size": 8},
            "eval": {"limit": limit, "batch_size": 16}}
    return {"run_id": run_id, "method": method, "task": "general", "seed": 0,
            "metrics": {"tiny_mmlu": {"metrics": {"acc,none": 0.4}, "stderr": {"acc,none": 0.01},
                                      "primary": "acc,none", "value": 0.4, "n": 50}},
            "column_tasks": ["tiny_mmlu"], "spec": spec,
            "training": {"trained": True, "parameters": {"percent_param": 0.123456789},
                         "train": {"steps": steps, "first_loss": 2.123456789012345,
                                   "final_loss": 1.0987654321098765}}}


def test_list_runs_tells_rows_apart_and_filters(store_env: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    store = RunStore()
    records = [_lora_record(8, 100), _lora_record(16, 100), _lora_record(32, 100),
               _lora_record(8, 5, max_steps=5), _lora_record(8, 100, method="hydralora")]
    for record in records:
        write_json_atomic(store.record_path(record["run_id"]), record)
    assert main(["list", "runs", "--method", "lora"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["run", "id", "method", "task", "seed", "score"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {r["run_id"] for r in records if r["method"] == "lora"}
    settings = {rid: line.split()[5:] for rid, line in rows.items()}
    assert settings["lora-general-s0-r16-m0"] == ["r=16", "steps=epochs", "limit=all"]
    assert settings["lora-general-s0-r8-m5"] == ["r=8", "steps=5", "limit=all"]
    assert len({" ".join(s) for s in settings.values()}) == 4  # no two rows read the same
    assert " 40.00 " in rows["lora-general-s0-r8-m0"]
    assert main(["list", "runs", "--task", "general", "--method", "hydralora"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == [
        "hydralora-general-s0-r8-m0"]
    assert main(["list", "runs", "--task", "law"]) == 0
    assert capsys.readouterr().out.strip() == "no finished runs matching --method/--task"
    assert main(["list", "methods", "--method", "lora"]) == 2


def test_show_prints_hyperparameters_and_rounded_figures(store_env: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    record = _lora_record(16, 100)
    write_json_atomic(RunStore().record_path(record["run_id"]),
                      with_provenance(record, hardware("Intel Xeon", 2)))
    assert main(["show", record["run_id"]]) == 0
    out = capsys.readouterr().out
    # In the record's key order (record.json is written with sorted keys).
    assert "adapter   alpha=32.0 num_heads=4 num_splits=4 rank=16" in out
    assert "train     batch_size=8 lr=0.0002 max_steps=0" in out
    assert "eval      batch_size=16" in out
    assert "loss 2.123 → 1.099, 0.1235 %Param" in out and "2.12345" not in out
    assert "hardware  Intel Xeon (2 logical cores); torch threads 2 intra-op" in out


# -- 5. --task a,b ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["run", "--method", "lora", "--task", "general,medical"],
    ["eval", "--model", "builtin:tiny", "--task", "lm-eval:arc_easy,arc_challenge"]])
def test_a_task_list_is_refused_in_one_line(argv: list[str], store_env: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hydrabench: error: --task takes one column "
                                                   "per run")
    assert "invalid run id" not in err and "lm-eval group" in err
    assert not (store_env / "results").exists()
