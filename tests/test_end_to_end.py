"""The walking skeleton end to end on tiny: train → artifact → lm-eval → record → report.

Real components throughout: the project-built tiny Llama, peft, lm-eval's HF backend, CodeCarbon.
Steps and documents are cut down (--max-steps, --limit) to keep this to about a minute.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hydrabench.report import write_table_report
from hydrabench.runner import execute
from hydrabench.spec import resolve_spec
from hydrabench.store import RunStore
from hydrabench.tables import load_table

QUICK = {"train": {"max_steps": 6}, "eval": {"limit": 6}}


def hydrabench(*args: str, env_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRABENCH_RESULTS": str(env_root / "results")}
    return subprocess.run([sys.executable, "-m", "hydrabench.cli", *args], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunStore, dict]:
    store = RunStore(tmp_path_factory.mktemp("e2e") / "results")
    spec = resolve_spec("lora", "general", overrides={**QUICK, "adapter": {"rank": 8}})
    return store, execute(spec, store=store)


def test_record_has_metrics_and_provenance(finished: tuple[RunStore, dict]) -> None:
    store, record = finished
    assert store.record_path(record["run_id"]).exists()
    assert set(record["metrics"]) == {"tiny_facts", "tiny_medical", "tiny_legal",
                                      "tiny_arithmetic", "tiny_bbh"}
    for metrics in record["metrics"].values():
        assert metrics["n"] == 6
        assert 0.0 <= metrics["value"] <= 1.0
        assert metrics["primary"] in metrics["metrics"]
    assert record["spec"]["adapter"]["rank"] == 8 and record["seed"] == 0
    prov = record["provenance"]
    assert len(prov["model_fingerprint"]) == 64
    assert len(prov["data_fingerprints"]["synthetic"]) == 64
    assert prov["packages"]["lm_eval"] and prov["packages"]["peft"] and prov["packages"]["torch"]
    assert "commit" in prov["git"] and prov["hardware"]["logical_cores"] >= 1
    train = record["training"]
    assert train["train"]["steps"] == 6 and train["train"]["trained_tokens"] > 0
    # LoRA r=8 on q_proj and v_proj of 2 layers (hidden 128): 2 * 2 * (128*8 + 8*128) parameters.
    assert train["parameters"]["adapter"] == 2 * 2 * (128 * 8 + 8 * 128)
    energy = record["metering"]["train"]["energy"]
    assert energy["cpu_source"] in ("estimated:codecarbon", "measured:rapl")
    assert energy["energy_measured"] is (energy["cpu_source"] == "measured:rapl")
    evaluation = record["metering"]["eval"]["throughput"]
    assert evaluation["requests"] > 5 * 6 and evaluation["prompt_tokens"] > evaluation["requests"]
    assert evaluation["generated_tokens"] > 0  # the arithmetic and BBH-like tasks generate
    run_dir = store.runs / record["run_id"]
    assert (run_dir / "lm_eval" / "lm_eval_results.json").exists()
    assert (run_dir / "lm_eval" / "samples_tiny_bbh.jsonl").exists()
    assert not list(store.runs.glob(".staging-*"))


def test_rerun_reuses_the_record(finished: tuple[RunStore, dict]) -> None:
    store, record = finished
    spec = resolve_spec("lora", "general", overrides={**QUICK, "adapter": {"rank": 8}})
    again = execute(spec, store=store)
    assert again["finished_at"] == record["finished_at"]


def test_other_column_reuses_the_trained_artifact(finished: tuple[RunStore, dict]) -> None:
    store, record = finished
    spec = resolve_spec("lora", "bbh", overrides={**QUICK, "adapter": {"rank": 8}})
    bbh = execute(spec, store=store)
    assert bbh["artifact"] == record["artifact"]
    assert list(bbh["metrics"]) == ["tiny_bbh"]


def test_table1_report_fills_only_cells_with_records(finished: tuple[RunStore, dict],
                                                     tmp_path: Path) -> None:
    store, record = finished
    table = load_table("table1")
    # The report looks records up by the run ids the table implies; reuse ours for the r=8 row.
    r8 = next(spec for row, _, spec in table.run_specs("tiny") if row.label == "LoRA (r=8)")
    target = store.runs / r8.run_id
    if not target.exists():
        target.symlink_to(store.runs / record["run_id"], target_is_directory=True)
    md, csv, tex = write_table_report(table, "tiny", (0,), store, tmp_path)
    text = md.read_text()
    assert "stand-in tasks" in text
    import pandas as pd

    frame = pd.read_csv(csv)
    mmlu = frame[frame["column"] == "MMLU"].set_index("row")
    expected = 100 * sum(m["value"] for m in record["metrics"].values()) / 5
    assert mmlu.loc["LoRA (r=8)", "value"] == pytest.approx(expected)
    assert mmlu.loc["LoRA (r=8)", "paper_value"] == 43.22
    assert pd.isna(mmlu.loc["LoRA (r=16)", "value"])
    assert re.search(r"\| LoRA \(r=16\)\s+\| —", text)
    assert "\\toprule" in tex.read_text()


def test_cli_errors_are_one_line_with_exit_2(tmp_path: Path) -> None:
    for args, needle in [
        (["run", "--method", "lorra", "--task", "general"], "did you mean 'lora'"),
        (["run", "--method", "lora", "--task", "general", "--rank", "0"], "rank must be >= 1"),
        (["run", "--method", "lora", "--task", "general", "--model", "./no/such/model"],
         "does not exist"),
        (["run", "--method", "lora", "--task", "general", "--target-modules", "nope_proj"],
         "target module(s) nope_proj not in model"),
    ]:
        result = hydrabench(*args, env_root=tmp_path)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("hydrabench:")]
        assert len(lines) == 1 and needle in lines[0], result.stderr
    assert not (tmp_path / "results").exists()  # nothing half-written


def test_list_commands(tmp_path: Path) -> None:
    out = hydrabench("list", "methods", env_root=tmp_path).stdout
    for name in ("base", "lora", "lora-split", "full", "hydralora"):
        assert f"\n{name} " in "\n" + out
    assert "tiny_arithmetic" in hydrabench("list", "tasks", env_root=tmp_path).stdout
