"""The `successors` table (issue 30, items 5 and 6): its rows on tiny at matched budgets, %Param
total and activated per token, three seeds by default, and the report's marks and notes for paper
numbers taken from other papers, models and protocols.

Reports are rendered from records planted as tests/test_report.py plants them (its helpers);
parameter counts come from the real methods adapting the project-built tiny Llama.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from test_report import PROFILE, make_record, markdown_table

from hydrabench.atomic import write_json_atomic
from hydrabench.cli import main
from hydrabench.config.tables import SOURCE_MARKS, TableSpec, load_table
from hydrabench.methods import get_method
from hydrabench.models import load_base_model
from hydrabench.pipeline.resolve import table_runs
from hydrabench.records.store import RunStore
from hydrabench.reports.tables import SOURCES_NOTE, write_table_report

HIDDEN, LAYERS, MODULES = 128, 2, 2  # the tiny Llama; q_proj and v_proj
# LoRA r=8's adapter on tiny: r (in + out) per adapted layer.
LORA_R8 = LAYERS * MODULES * 8 * (HIDDEN + HIDDEN)


@pytest.fixture(scope="module")
def table() -> TableSpec:
    return load_table("successors")


def test_rows_resolve_on_tiny_three_seeds_by_default(table: TableSpec) -> None:
    assert table.seeds == (0, 1, 2)
    specs = table_runs(table, PROFILE, table.seeds)
    tasks = ["general", "medical", "law", "code", "code_p10", "math"]
    assert table.tasks() == tasks
    assert len(specs) == len({spec.run_id for _, _, spec in specs}) == 8 * len(tasks) * 3
    settings = {row.label: (spec.method, spec.adapter.rank, spec.adapter.num_heads,
                            spec.adapter.top_k) for row, _, spec in specs}
    assert settings == {
        "LoRA (r=8)": ("lora", 8, 4, None), "LoRA (r=32)": ("lora", 32, 4, None),
        "HydraLoRA (r=8, N=3)": ("hydralora", 8, 3, None),
        "HydraLoRA uniform (r=8, N=3)": ("hydralora-uniform", 8, 3, None),
        "MoSLoRA (r=16)": ("moslora", 16, 4, None),
        "MoLoRA (4×r=4, top-2)": ("molora", 4, 4, 2),
        "R-LoRA (r=8, N=3)": ("r-lora", 8, 3, None),
        "FlyLoRA (r=32, k=8)": ("flylora", 32, 4, 8)}
    # One training per row and seed serves all its columns.
    assert len({spec.train_id for _, _, spec in specs}) == 8 * 3
    # The code columns opt in to running model-written code, as Table 2's.
    assert all(spec.eval.allow_code_execution == (task in ("code", "code_p10"))
               for _, task, spec in specs)


def test_parameter_budgets_total_and_active_on_tiny(table: TableSpec) -> None:
    """Each row's method adapts the tiny Llama at the row's settings: the successors' totals
    match the HydraLoRA paper's budget (= LoRA r=16, twice r=8), and only the top-k methods
    activate less per token than they hold."""
    specs = {row.label: spec for row, task, spec in table_runs(table, PROFILE) if task == "math"}
    base_total = sum(p.numel() for p in load_base_model("builtin:tiny").model.parameters())
    counts = {}
    for label, spec in specs.items():
        torch.manual_seed(0)
        method = get_method(spec.method)
        model = method.adapt(load_base_model("builtin:tiny").model, spec, [])
        counts[label] = method.parameter_counts(model, base_total)
    mixer = LAYERS * MODULES * 16 * 16  # MoSLoRA's r x r mixer at r=16
    expected = {  # (adapter, active)
        "LoRA (r=8)": (LORA_R8, LORA_R8), "LoRA (r=32)": (4 * LORA_R8, 4 * LORA_R8),
        "HydraLoRA (r=8, N=3)": (2 * LORA_R8, 2 * LORA_R8),
        "HydraLoRA uniform (r=8, N=3)": (2 * LORA_R8, 2 * LORA_R8),
        "MoSLoRA (r=16)": (2 * LORA_R8 + mixer, 2 * LORA_R8 + mixer),
        "MoLoRA (4×r=4, top-2)": (2 * LORA_R8, LORA_R8),  # 2 of 4 experts
        "R-LoRA (r=8, N=3)": (2 * LORA_R8, 2 * LORA_R8),
        "FlyLoRA (r=32, k=8)": (2 * LORA_R8, LORA_R8 // 2)}  # B: out x 32, 8 columns act
    assert {label: (c["adapter"], c["active"]) for label, c in counts.items()} == expected
    for c in counts.values():
        assert c["percent_param"] == pytest.approx(100 * c["adapter"] / base_total)
        assert c["percent_param_active"] == pytest.approx(100 * c["active"] / base_total)


def plant(store: RunStore, table: TableSpec, seeds: tuple[int, ...],
          tasks: tuple[str, ...] = ("general", "math"),
          without_active: str | None = None) -> dict[str, tuple[float, float]]:
    """Records for every row on `tasks` and `seeds`, as test_report's, with %Param total and
    active (they differ for MoLoRA and FlyLoRA). The row `without_active` has records written
    before percent_param_active existed. Returns row label → (total, active)."""
    params = {}
    for i, row in enumerate(table.rows):
        total = 0.01 * (i + 1)
        params[row.label] = (total, total / 2 if row.method in ("molora", "flylora") else total)
    for row, task, spec in table_runs(table, PROFILE, seeds):
        if task not in tasks:
            continue
        record = make_record(spec, [r.label for r in table.rows].index(row.label))
        total, active = params[row.label]
        record["training"]["parameters"] = {"percent_param": total}
        if row.label != without_active:
            record["training"]["parameters"]["percent_param_active"] = active
        write_json_atomic(store.record_path(spec.run_id), record)
    return params


def test_report_marks_paper_sources_and_shows_both_param_counts(
        table: TableSpec, store: RunStore, tmp_path: Path) -> None:
    params = plant(store, table, table.seeds, without_active="LoRA (r=32)")
    md, csv, tex, _ = write_table_report(table, PROFILE, None, store, tmp_path)
    text = md.read_text()
    assert "seeds: 0, 1, 2" in text
    shown = markdown_table(text).set_index("Method")
    a, b, c = SOURCE_MARKS[:3]
    # Each row's paper numbers carry its source's mark; a row with no source has none.
    assert shown.loc["HydraLoRA (r=8, N=3)", "MMLU (paper)"] == f"47.22{a}"
    assert shown.loc["LoRA (r=32)", "GSM8K (paper)"] == f"20.67{a}"
    assert shown.loc["R-LoRA (r=8, N=3)", "HumanEval P@10 (paper)"] == f"27.27{b}"
    assert shown.loc["R-LoRA (r=8, N=3)", "HumanEval P@1 (paper)"] == "—"
    assert shown.loc["FlyLoRA (r=32, k=8)", "MMLU (paper)"] == f"53.68{c}"
    assert shown.loc["FlyLoRA (r=32, k=8)", "GSM8K (paper)"] == f"80.82{c}"
    assert shown.loc["MoSLoRA (r=16)", "MMLU (paper)"] == "—"
    # Beside them, that they do not compare, and each source.
    lines = text.splitlines()
    assert f"- {SOURCES_NOTE}" in lines
    for row in table.rows:
        if row.source:
            assert f"- {table.sources()[row.source]} {row.source}" in lines
    assert sum(line.startswith(f"- {a} HydraLoRA (Tian et al.") for line in lines) == 1
    assert any("GOAT (ICML'25, LLaMA-2-7B) GSM8K 57.39" in line for line in lines)
    # %Param total and active, each as recorded; a record without the active count shows "—".
    for label, (total, active) in params.items():
        assert shown.loc[label, "%Param (ours)"] == format(total, ".4g")
        assert shown.loc[label, "%Param (active) (ours)"] == (
            "—" if label == "LoRA (r=32)" else format(active, ".4g"))
    assert "%Param (active) (paper)" not in shown.columns  # no paper counts them: no dashes
    assert shown.loc["MoLoRA (4×r=4, top-2)", "%Param (active) (ours)"] != shown.loc[
        "MoLoRA (4×r=4, top-2)", "%Param (ours)"]
    # The CSV names each paper number's source; the LaTeX marks and lists them.
    tidy = pd.read_csv(csv).set_index(["row", "paper_column"])
    fly = next(row for row in table.rows if row.method == "flylora")
    assert tidy.loc[(fly.label, "MMLU"), "paper_source"] == fly.source
    assert tidy.loc[(fly.label, "%Param (active)"), "value"] == pytest.approx(
        params[fly.label][1])
    latex = tex.read_text()
    assert r"53.68\textsuperscript{c}" in latex
    assert SOURCES_NOTE[0].upper() + SOURCES_NOTE[1:] + "." in latex.replace("\n", " ")
    assert r"\textsuperscript{b} R-LoRA (Liu et al., 2025" in latex


def test_other_tables_csv_has_no_source_column(store: RunStore, tmp_path: Path) -> None:
    table2 = load_table("table2")
    assert not table2.sources()
    csv = write_table_report(table2, PROFILE, (0,), store, tmp_path)[1]
    assert "paper_source" not in pd.read_csv(csv).columns


def test_sweep_runs_the_tables_seeds_unless_told(store_env: Path, table: TableSpec,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ids = {seed: {spec.run_id for _, _, spec in table_runs(table, PROFILE, (seed,))}
           for seed in table.seeds}
    assert main(["sweep", "successors", "--status"]) == 0
    listed = capsys.readouterr().out
    assert all(run_id in listed for seed in table.seeds for run_id in ids[seed])
    assert main(["sweep", "successors", "--status", "--seeds", "1"]) == 0
    listed = capsys.readouterr().out
    assert all(run_id in listed for run_id in ids[1])
    assert not any(run_id in listed for seed in (0, 2) for run_id in ids[seed])
    # Tables without `seeds:` keep seed 0.
    assert load_table("table2").seeds == (0,)


def test_bad_seeds_in_a_table_spec_is_refused(table: TableSpec) -> None:
    from dataclasses import replace

    from hydrabench.errors import SpecError

    for bad in ((), (-1,), (0.5,)):
        with pytest.raises(SpecError, match="seeds must be"):
            replace(table, seeds=bad)
