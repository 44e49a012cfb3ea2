"""Flags and profile values a hostile tester tried (issue 32): each is one line on stderr, exit 2,
before any work, with nothing written under results/. In-process, as test_bad_input."""

import os
from pathlib import Path

import pytest
from conftest import assert_refused_in_one_line, error_lines
from test_bad_input import RUN, STORIES, profile_file

from hydrabench.cli import main
from hydrabench.data.synthetic import EVAL_ITEMS

HUGE = "99999999999999999999"  # beyond 64 bits: torch, numpy and lm-eval fail on it
EVAL = ["eval", "--model", STORIES, "--task", "general"]
ON_STORIES = [*RUN, "--model", STORIES]  # a real model with 8 attention heads, no build needed
VLLM = [*ON_STORIES, "--backend", "vllm", "--profile"]

CASES = [
    ("run --limit 1e20", [*RUN, "--limit", "1e20"], "argument --limit: invalid int value"),
    ("run --limit huge", [*RUN, "--limit", HUGE], "eval setting limit must be below 2**63"),
    ("eval --limit 1e20", [*EVAL, "--limit", "1e20"], "argument --limit: invalid int value"),
    ("eval --limit huge", [*EVAL, "--limit", HUGE], "eval setting limit must be below 2**63"),
    ("eval --num-fewshot huge", [*EVAL, "--num-fewshot", HUGE],
     "eval setting num_fewshot must be below 2**63"),
    ("--num-heads 1e20", [*RUN, "--num-heads", "1e20"],
     "argument --num-heads: must be an integer or 'auto', got '1e20'"),
    ("--num-heads huge", [*RUN, "--num-heads", HUGE], "adapter setting num_heads must be below"),
    ("--num-splits 1e20", [*RUN, "--num-splits", "1e20"], "argument --num-splits: invalid int"),
    ("--num-fewshot beyond the task's pool", [*EVAL, "--num-fewshot", "1000", "--limit", "2"],
     f"num_fewshot 1000: task tiny_facts has {EVAL_ITEMS['facts']} few-shot examples to draw "
     "from"),
    ("profile: bad dtype", [*RUN, "--profile", profile_file("extends: tiny\ndtype: float99\n")],
     "unknown dtype 'float99'; valid: float32, float16, bfloat16"),
    ("profile: bad device", [*RUN, "--profile", profile_file("extends: tiny\ndevice: tpu9\n")],
     "unknown device 'tpu9'; valid: cpu, cuda, mps, auto, cuda:N"),
    ("profile: bad prompt_template",
     [*RUN, "--profile", profile_file("extends: tiny\nprompt_template: chatml\n")],
     "unknown prompt_template 'chatml'; valid: plain, alpaca, reference"),
    ("profile: negative slurm cpus, sweep --status",
     ["sweep", "table1", "--status", "--profile",
      profile_file("extends: tiny\nslurm: {cpus: -3}\n")],
     "slurm cpus must be an integer >= 1, got -3"),
    ("profile: negative slurm time, sweep",
     ["sweep", "table1", "--profile", profile_file("extends: tiny\nslurm: {time_min: -1}\n")],
     "slurm time_min must be an integer >= 1, got -1"),
    ("profile: slurm mem not a size",
     ["sweep", "table1", "--status", "--profile",
      profile_file("extends: tiny\nslurm: {mem: -4G}\n")],
     "slurm mem must be a size such as 4G"),
    ("--model of 5,000 characters", [*RUN, "--model", "m" * 5000],
     "(5000 characters) is not found locally: File name too long"),
    ("--model of an unknown ~user", [*RUN, "--model", "~no_such_user_of_thirty_chars"],
     "model ~no_such_user_of_thirty_chars is not found locally"),
    ("--target-modules lm_head", [*ON_STORIES, "--target-modules", "lm_head"],
     "lm_head is the output head of model"),
    ("--gen-kwargs max_gen_toks=abc", [*RUN, "--gen-kwargs", "max_gen_toks=abc"],
     "gen_kwargs max_gen_toks must be an integer >= 1, got 'abc'"),
    ("--gen-kwargs max_gen_toks=-5", [*RUN, "--gen-kwargs", "max_gen_toks=-5"],
     "gen_kwargs max_gen_toks must be an integer >= 1, got '-5'"),
    ("--gen-kwargs temperature=nan", [*RUN, "--gen-kwargs", "temperature=nan"],
     "gen_kwargs temperature must be a finite number >= 0, got 'nan'"),
    ("--gen-kwargs bogus=1", [*RUN, "--gen-kwargs", "bogus=1"],
     "unknown gen_kwargs key 'bogus'; valid: max_gen_toks"),
    ("eval --gen-kwargs top_p=2", [*EVAL, "--gen-kwargs", "max_gen_toks=8,top_p=2"],
     "gen_kwargs top_p must be a number in (0, 1]"),
    ("profile: vllm max_model_len -5",
     [*VLLM, profile_file("extends: tiny\neval: {max_model_len: -5}\n")],
     "max_model_len must be >= 1, got -5"),
    ("profile: vllm max_model_len beyond the model's context",
     [*VLLM, profile_file("extends: tiny\neval: {max_model_len: 4096}\n")],
     "eval max_model_len 4096 exceeds the context of"),
    ("profile: vllm tensor_parallel_size not dividing the heads",
     [*VLLM, profile_file("extends: tiny\neval: {tensor_parallel_size: 3}\n")],
     "eval tensor_parallel_size 3 does not divide the 8 attention heads"),
]


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_flag_is_one_line_exit_2_nothing_written(argv: list, message: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.delenv("HYDRABENCH_DATA_DIR", raising=False)
    argv = [a(tmp_path) if callable(a) else a for a in argv]
    assert_refused_in_one_line(argv, message, tmp_path / "results", capsys)


def test_valid_gen_kwargs_and_slurm_settings_are_accepted() -> None:
    """The checks refuse only what lm-eval or Slurm would: what the shipped profiles and tests
    use passes."""
    from hydrabench.config.spec import EvalSettings
    from hydrabench.pipeline.sweep import slurm_parameters

    settings = EvalSettings(gen_kwargs="max_gen_toks=128,temperature=0,do_sample=false,until=###")
    assert settings.gen_kwargs.startswith("max_gen_toks=128")
    assert slurm_parameters("paper")["mem"] == "64G"


def test_slurm_without_sbatch_is_one_line_before_planning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on it
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    assert_refused_in_one_line(["sweep", "table1", "--executor", "slurm"],
                               "--executor slurm, but Slurm's sbatch is not installed here",
                               tmp_path / "results", capsys)


def test_a_run_that_fails_before_any_checkpoint_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """--lr 1e308 is valid input whose loss turns NaN at once: the one line, and no .locks,
    checkpoint or artifact folder left under results/."""
    results = tmp_path / "results"
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(results))
    assert main([*ON_STORIES, "--lr", "1e308", "--max-steps", "4"]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "training loss became nan" in errors[0], errors
    assert not results.exists(), sorted(os.listdir(results))


def test_a_failed_run_keeps_what_was_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Cleaning up after a failed run removes only what it made: a checkpoint folder and locks
    already there (a killed training's, to resume from) stay."""
    from hydrabench.records.store import RunStore

    results = tmp_path / "results"
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(results))
    from hydrabench.pipeline.resolve import resolve_spec

    spec = resolve_spec("lora", "general", model=STORIES, overrides={
        "train": {"lr": 1e308, "max_steps": 4}})
    store = RunStore(results)
    kept = store.checkpoint_dir(spec.train_id)
    kept.mkdir(parents=True)
    (kept / "note").write_text("a killed training's")
    lock = results / ".locks" / f"{spec.run_id}.lock"
    lock.parent.mkdir()
    lock.touch()
    assert main([*ON_STORIES, "--lr", "1e308", "--max-steps", "4"]) == 2
    assert (kept / "note").exists() and lock.exists()
    assert not (results / "runs").exists()
    assert not list(results.glob(".locks/train-*"))
