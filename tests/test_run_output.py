"""What `hydrabench run` tells its user, through the real command line run as a process from a
folder that is not a git repository (as a user's would be)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env

RUN = ["--task", "medical", "--max-steps", "3", "--limit", "2"]
# lm-eval's known noise, filtered where hydrabench calls lm-eval.
NOISE = ("`pretrained` model kwarg is not of type `str`", "Custom kwargs can be passed",
         "fatal: not a git repository")


def hydrabench(args: list[str], folder: Path) -> subprocess.CompletedProcess:
    env = child_env(folder / "results", OMP_NUM_THREADS="1")  # a CPU run, also on a GPU box
    done = subprocess.run([sys.executable, "-m", "hydrabench.cli", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_run_prints_the_base_score_keeps_the_loss_curve_and_no_lm_eval_noise(
        tmp_path: Path) -> None:
    base = hydrabench(["run", "--method", "base", *RUN], tmp_path)
    assert " base " not in base.stdout  # the base model is not its own baseline
    trained = hydrabench(["run", "--method", "lora", *RUN], tmp_path)
    for noise in NOISE:
        assert noise not in base.stderr + trained.stderr, noise
    (base_path,) = (tmp_path / "results").glob("runs/base-*/record.json")
    base_value = json.loads(base_path.read_text())["metrics"]["tiny_medical"]["value"]
    line = next(x for x in trained.stdout.splitlines() if x.startswith("tiny_medical"))
    assert " ± " in line and "(n=2)" in line and line.endswith(f"base {base_value:.4f}"), line

    (path,) = (tmp_path / "results").glob("runs/lora-*/record.json")
    train = json.loads(path.read_text())["training"]["train"]
    curve = train["curve"]
    assert [point["step"] for point in curve] == [1, 2, 3]
    assert curve[0]["loss"] == train["first_loss"] and curve[-1]["loss"] == train["final_loss"]
    assert all(math.isfinite(p["loss"]) and p["lr"] > 0 for p in curve)


def test_dry_run_prints_the_plan_and_a_training_example_and_writes_nothing(
        tmp_path: Path, capsys, monkeypatch) -> None:
    from hydrabench.cli import main

    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    corpus = tmp_path / "spell.json"
    corpus.write_text(json.dumps([{"instruction": "Spell the word backwards.", "input": "basket",
                                   "output": "teksab"}]))
    profile = tmp_path / "mine.yaml"
    profile.write_text(f"extends: tiny\ntasks: {{general: {{corpus: {corpus}, "
                       f"eval: [tiny_facts]}}}}\n")
    argv = ["run", "--method", "lora", "--task", "general", "--profile", str(profile)]
    assert main([*argv, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "plan: lora-general-" in err and "train lora on 1 records" in err
    assert f"; results in {tmp_path / 'results'}" in err
    # The plain template puts the input on a line of its own, as the trainer sees it (BOS, EOS).
    assert "prompt: '<s>Spell the word backwards.\\nbasket'" in out
    assert "target: 'teksab</s>'" in out
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*"))


def test_eval_says_which_bbh_it_took_and_gen_kwargs_fit_a_generation_task_to_the_context(
        tmp_path: Path, capsys, monkeypatch) -> None:
    """stories260K (512 tokens of context) on lm-eval's BBH, whose chain-of-thought tasks generate
    up to 1024 tokens: refused in one line before any work, scored with --gen-kwargs."""
    from conftest import SHARED, error_lines

    from hydrabench.cli import main

    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(SHARED / "data"))
    model = str(SHARED / "models" / "stories260K")
    real = ["eval", "--model", model, "--task", "lm-eval:bbh", "--limit", "1"]
    assert main(real) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [
        "hydrabench: error: task bbh_cot_fewshot_boolean_expressions generates up to 1024 "
        "tokens, but the model's context is 512 tokens; lower it with --gen-kwargs "
        "max_gen_toks=N (N < 512)"]
    assert not (tmp_path / "results").exists()

    assert main([*real, "--gen-kwargs", "max_gen_toks=8"]) == 0
    assert "nothing to train; evaluate bbh (hf), lm-eval's task bbh;" in capsys.readouterr().err
    (results,) = (tmp_path / "results").glob("runs/*/lm_eval/lm_eval_results.json")
    configs = json.loads(results.read_text())["configs"]
    assert {c["generation_kwargs"]["max_gen_toks"] for c in configs.values()} == {8}

    assert main(["eval", "--model", model, "--task", "bbh", "--limit", "1"]) == 0
    assert ("evaluate tiny_bbh (hf), the tiny profile's stand-in column bbh (lm-eval's own bbh: "
            "eval --task lm-eval:bbh)") in capsys.readouterr().err


def test_lm_eval_says_a_truncation_once(caplog) -> None:
    """HFLM warns per request it truncates; a context of 8 tokens truncates every request of the
    real lm-eval evaluations here, and the log says so once per evaluation."""
    import logging

    from hydrabench.evaluation.harness import TRUNCATION, evaluate_model
    from hydrabench.models import load_base_model

    base = load_base_model("builtin:tiny")
    with caplog.at_level(logging.WARNING, logger="lm_eval.models.huggingface"):
        for _ in range(2):
            evaluate_model(base.model, base.tokenizer, ["tiny_medical"], batch_size=1, limit=3,
                           seed=0, max_length=8)
    said = [r.getMessage() for r in caplog.records if TRUNCATION in r.getMessage()]
    assert len(said) == 2 and all("said once per evaluation" in x for x in said), said


def test_the_plan_lines_name_the_results_folder_as_an_absolute_path(
        tmp_path: Path, capsys, monkeypatch) -> None:
    """The default results folder is ./results, relative to where the command runs: run's and
    reproduce's plan lines say, as an absolute path, which one they write to."""
    from hydrabench.cli import main
    from hydrabench.config.tables import load_table
    from hydrabench.pipeline.sweep import Sweep
    from hydrabench.records.store import RunStore

    monkeypatch.delenv("HYDRABENCH_RESULTS", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["run", "--method", "lora", "--task", "medical", "--dry-run"]) == 0
    plan = next(line for line in capsys.readouterr().err.splitlines() if "plan: " in line)
    assert plan.endswith(f"; results in {elsewhere / 'results'}"), plan

    monkeypatch.setenv("HYDRABENCH_RESULTS", "mine")  # relative too: said absolute
    Sweep(load_table("table1"), "tiny", [], execute=None, store=RunStore()).log_plan()
    plan = capsys.readouterr().err.strip()
    assert plan.endswith(f"; results in {elsewhere / 'mine'}"), plan
    assert not any(elsewhere.iterdir())  # planning wrote nothing
