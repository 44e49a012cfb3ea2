"""Every kind of bad input: one line on stderr naming the problem, exit code 2, nothing written
under results/. Runs the real command line in-process (the code path of the `hydrabench` script)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    SHARED,
    assert_refused_in_one_line,
    child_env,
    error_lines,
    mounted_tmpfs,
)

from hydrabench.cli import main
from hydrabench.training.loop import TrainingOutOfMemory, train

STORIES = str(SHARED / "models" / "stories260K")
RUN = ["run", "--method", "lora", "--task", "general"]


def not_a_causal_lm(tmp_path: Path) -> str:
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(tmp_path / "bert")
    return str(tmp_path / "bert")


def profile_file(text: str):
    """A callable writing the user's own profile with `text`; gives its path."""
    def write(tmp_path: Path) -> str:
        (tmp_path / "mine.yaml").write_text(text)
        return str(tmp_path / "mine.yaml")
    return write


def two_gigabyte_corpus(tmp_path: Path) -> str:
    """The user's own profile whose general column trains on a 2 GiB JSONL file (sparse: it
    takes no disk)."""
    with (tmp_path / "huge.jsonl").open("wb") as f:
        f.truncate(2 << 30)
    return profile_file(f"extends: tiny\ntasks: {{general: {{corpus: {tmp_path / 'huge.jsonl'}, "
                        f"eval: [tiny_facts]}}}}\n")(tmp_path)


def two_record_corpus(tmp_path: Path) -> str:
    """The user's own profile whose general column trains on a corpus of two records."""
    (tmp_path / "two.json").write_text('[{"instruction": "a", "output": "b"}, '
                                       '{"instruction": "c", "output": "d"}]')
    return profile_file(f"extends: tiny\ntasks: {{general: {{corpus: {tmp_path / 'two.json'}, "
                        f"eval: [tiny_facts]}}}}\n")(tmp_path)


def task_folder(files: dict[str, str]):
    """A callable writing the user's own task folder (--include-path) with `files`; gives its
    path."""
    def write(tmp_path: Path) -> str:
        for name, text in files.items():
            (tmp_path / "mine" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "mine" / name).write_text(text)
        return str(tmp_path / "mine")
    return write


def binary_profile(tmp_path: Path) -> str:
    (tmp_path / "mine.yaml").write_bytes(b"\x00\xff\xfe\x80 not YAML")
    return str(tmp_path / "mine.yaml")


CASES = [
    ("unknown method", ["run", "--method", "lorra", "--task", "general"], "did you mean 'lora'"),
    ("unknown task", ["run", "--method", "lora", "--task", "maths"], "did you mean 'math'"),
    ("unknown profile", [*RUN, "--profile", "tinny"], "did you mean 'tiny'"),
    ("missing profile file", [*RUN, "--profile", "no/such.yaml"],
     "profile file no/such.yaml not found"),
    ("malformed profile file", [*RUN, "--profile", profile_file("extends: tiny\ntrain: [1\n")],
     "malformed YAML at"),
    ("unknown sharding config", ["run", "--method", "full", "--task", "general", "--profile",
                                 profile_file("extends: tiny\nsharding: {full: fsdp_fulll}\n")],
     "did you mean 'fsdp_full'"),
    ("unknown table", ["report", "tabel1"], "did you mean 'table1'"),
    ("unknown lm-eval task", ["eval", "--model", "builtin:tiny", "--task", "tiny_mdical"],
     "did you mean 'tiny_medical'"),
    ("rank <= 0", [*RUN, "--rank", "0"], "rank must be >= 1"),
    ("num_heads < 1", ["run", "--method", "hydralora", "--task", "general", "--num-heads", "0"],
     "num_heads must be >= 1"),
    ("alpha <= 0", [*RUN, "--alpha", "0"], "alpha must be > 0"),
    ("lr <= 0", [*RUN, "--lr=-1e-4"], "lr must be > 0"),
    ("seq len <= 0", [*RUN, "--seq-len", "0"], "seq_len must be >= 8"),
    ("target module not in model", [*RUN, "--target-modules", "q_proj,qkv"],
     "target module(s) qkv not in model"),
    ("missing model path", [*RUN, "--model", "./no/such/model"], "does not exist"),
    ("not a causal LM", [*RUN, "--model", not_a_causal_lm], "cannot load causal LM"),
    ("hub dataset offline", ["run", "--profile", "paper", "--model", STORIES, "--method", "lora",
                             "--task", "math"], "cannot load hub dataset 'openai/gsm8k'"),
    ("vllm for an unmergeable method", ["run", "--method", "prompt-tuning", "--task", "medical",
                                        "--backend", "vllm"], "cannot be merged"),
    ("num_splits 0", ["run", "--method", "lora-split", "--task", "general", "--num-splits", "0"],
     "num_splits must be >= 1"),
    ("more splits than training records", ["run", "--method", "lora-split-sum", "--task",
                                           "general", "--num-splits", "3", "--profile",
                                           two_record_corpus], "need at least 3 training records"),
    ("vllm for lora-split-routed", ["run", "--method", "lora-split-routed", "--task", "medical",
                                    "--backend", "vllm"], "cannot be merged"),
    ("merge gap of an exactly merged method", ["run", "--method", "lora", "--task", "medical",
                                               "--merge-gap"],
     "--merge-gap scores a method's approximate merges, and lora has none (it merges exactly)"),
    ("merge gap of an unmergeable method", ["run", "--method", "prefix-tuning", "--task",
                                            "medical", "--merge-gap"],
     "prefix-tuning has none (it cannot be merged); methods that have some: lora-split, "
     "hydralora, hydralora-uniform, loramoe"),
    ("no GPU for a GPU-only profile", ["run", "--profile", "paper", "--method", "lora",
                                       "--task", "math"], "needs a GPU"),
    ("code without opt-in", ["run", "--method", "lora", "--task", "code"],
     "--allow-code-execution"),
    ("2 GiB corpus file", [*RUN, "--profile", two_gigabyte_corpus],
     "is 2.0 GiB; hydrabench holds a corpus in memory and reads files up to 1 GiB"),
    ("run id escaping results/", ["export", "../../etc"], "invalid run id"),
    ("profile: rank not a number", [*RUN, "--profile", profile_file(
        "extends: tiny\nadapter: {rank: eight}\n")], "rank must be an integer, got 'eight'"),
    ("profile: lr a list", [*RUN, "--profile", profile_file("extends: tiny\ntrain: {lr: [1]}\n")],
     "lr must be a number, got [1]"),
    ("profile: train not a mapping", [*RUN, "--profile", profile_file("extends: tiny\ntrain: 5\n")],
     "train must be a mapping, got 5"),
    ("profile: tasks not a mapping", [*RUN, "--profile", profile_file("extends: tiny\ntasks: 7\n")],
     "tasks must be a mapping, got 7"),
    ("profile: model not a string", [*RUN, "--profile", profile_file("extends: tiny\nmodel: 5\n")],
     "model must be a string, got 5"),
    ("profile: task without eval", [*RUN, "--profile", profile_file(
        "extends: tiny\ntasks: {mine: {corpus: synthetic}}\n")], "task mine has no eval"),
    ("profile: task without corpus", [*RUN, "--profile", profile_file(
        "extends: tiny\ntasks: {mine: {eval: [tiny_medical]}}\n")], "task mine has no corpus"),
    ("profile: extends loop", [*RUN, "--profile", lambda tmp_path: profile_file(
        f"extends: {tmp_path / 'mine.yaml'}\n")(tmp_path)], "profile extends loop"),
    ("profile: binary file", [*RUN, "--profile", binary_profile], "is not a YAML text file"),
    ("profile: unknown key", [*RUN, "--profile", profile_file("extends: tiny\ntrian: {lr: 1}\n")],
     "did you mean 'train'"),
    ("profile: batch_size 2.5", [*RUN, "--profile", profile_file(
        "extends: tiny\ntrain: {batch_size: 2.5}\n")], "batch_size must be an integer, got 2.5"),
    ("profile: max_steps true", [*RUN, "--profile", profile_file(
        "extends: tiny\ntrain: {max_steps: true}\n")], "max_steps must be an integer, got True"),
    ("profile: include_path missing", [*RUN, "--profile", profile_file(
        "extends: tiny\ninclude_path: [nowhere]\n")], "nowhere: no such folder"),
    ("profile: include_path a mapping", [*RUN, "--profile", profile_file(
        "extends: tiny\ninclude_path: {a: 1}\n")], "include_path must be a list of folders"),
    ("include: missing folder", [*RUN, "--include-path", "no/such/dir"],
     "--include-path no/such/dir: no such folder"),
    ("include: task YAML that does not parse", [*RUN, "--include-path", task_folder(
        {"mine.yaml": "task: [mine\n"})], "malformed YAML at"),
    ("include: task named like a shipped one", ["eval", "--model", "builtin:tiny", "--task",
                                                "tiny_facts", "--include-path", task_folder(
        {"facts.yaml": "task: tiny_facts\n"})], "task tiny_facts is already defined by"),
    ("include: table named like a shipped one", ["report", "table1", "--include-path",
                                                 task_folder({"tables/table1.yaml": "x: 1\n"})],
     "table table1 is already defined by"),
    ("lr inf", [*RUN, "--lr", "inf"], "lr must be a finite number"),
    ("alpha inf", [*RUN, "--alpha", "inf"], "alpha must be a finite number"),
    ("seed < 0", [*RUN, "--seed=-1"], "seed must be an integer in [0, 2**32)"),
    ("seed >= 2**32", [*RUN, "--seed", str(2**32)], "seed must be an integer in [0, 2**32)"),
    ("absurd rank", [*RUN, "--rank", "100000000"], "rank 100000000 exceeds the width"),
    ("flag of the wrong type", [*RUN, "--rank", "eight"], "argument --rank: invalid int value"),
    ("missing argument", ["run", "--method", "lora"], "arguments are required: --task"),
    ("generation budget beyond the context", ["eval", "--model", "builtin:tiny", "--task", "math",
                                              "--gen-kwargs", "max_gen_toks=100000"],
     "generates up to 100000 tokens, but the model's context is"),
    ("gen-kwargs not key=value", [*RUN, "--gen-kwargs", "max_gen_toks"],
     "gen_kwargs must be key=value pairs"),
]



@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(argv: list, message: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.is_available() and "needs a GPU" in message:
        pytest.skip("a GPU is visible here")
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.delenv("HYDRABENCH_DATA_DIR", raising=False)
    argv = [a(tmp_path) if callable(a) else a for a in argv]
    assert_refused_in_one_line(argv, message, tmp_path / "results", capsys)


def test_merge_gap_is_accepted_where_the_method_has_approximate_merges() -> None:
    # LoRAMoE, LoRA-Split and R-LoRA train HydraLoRA adapters (an A per head): the same merges.
    from hydrabench.methods import METHODS
    from hydrabench.pipeline.resolve import resolve_spec

    having = [m.name for m in METHODS.values() if m.approximate_merges]
    assert having == ["lora-split", "hydralora", "hydralora-uniform", "loramoe", "r-lora"]
    for method in having:
        assert resolve_spec(method, "medical", overrides={"eval": {"merge_gap": True}}
                            ).eval.merge_gap


def test_out_of_memory_names_the_batch_that_failed() -> None:
    """CUDA OOM cannot happen on this CPU machine, so the model raises it (a stand-in)."""
    from hydrabench.config.spec import TrainSettings
    from hydrabench.data.records import InstructionRecord

    class Exploding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **batch: torch.Tensor) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory")

    from hydrabench.models import load_base_model

    tokenizer = load_base_model("builtin:tiny").tokenizer
    records = [InstructionRecord("Question: 1 + 1?\nAnswer:", " 2")] * 8
    with pytest.raises(TrainingOutOfMemory, match=r"batch size 4 × \d+ tokens; lower --batch-size"):
        train(Exploding(), tokenizer, records, TrainSettings(batch_size=4, seq_len=64), seed=0,
              template="plain")


def test_code_execution_without_its_sandbox_is_refused_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A machine without bubblewrap (a PATH without `bwrap` stands in for one): the run stops
    before training, not after the model wrote its programs."""
    from hydrabench.evaluation import sandbox
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox._probe_walls.cache_clear()
    try:
        assert_refused_in_one_line(
            ["run", "--method", "lora", "--task", "code", "--allow-code-execution"],
            "needs bubblewrap, which is not installed", tmp_path / "results", capsys)
    finally:
        sandbox._probe_walls.cache_clear()


def test_a_loss_that_turns_nan_stops_in_one_line_with_no_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """An lr of 1e30 is valid input; the weights it gives overflow, and the loss turns NaN."""
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    assert main(["run", "--method", "lora", "--task", "medical", "--model", STORIES,
                 "--lr", "1e30", "--max-steps", "4"]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "training loss became nan" in errors[0], errors
    assert not list((tmp_path / "results").glob("runs/*/record.json"))
    assert not list((tmp_path / "results").glob("artifacts/*/artifact.json"))


@pytest.mark.parametrize("data_dir", ["missing", "empty"])
def test_a_missing_or_empty_data_dir_is_one_line(data_dir: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(tmp_path / data_dir))
    assert_refused_in_one_line(
        ["eval", "--model", STORIES, "--task", "mmlu_anatomy", "--limit", "2"],
        f"{tmp_path / data_dir}/mmlu does not exist", tmp_path / "results", capsys)


def test_a_results_folder_that_refuses_writes_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """/sys refuses new folders even to root (a chmod'ed folder would not stop root)."""
    monkeypatch.setenv("HYDRABENCH_RESULTS", "/sys/hydrabench-results")
    assert main(["run", "--method", "lora", "--task", "medical", "--model", STORIES,
                 "--max-steps", "2", "--limit", "2"]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "cannot write /sys/hydrabench-results" in errors[0], errors


BROKEN_TASK_FILES = {  # tasks/tiny file → (its broken text from the good one, the error's words)
    "syntax": ("tiny_medical.yaml", lambda text: text + "dataset_kwargs: [component\n",
               "malformed YAML at"),
    "missing function": ("_tiny_mc_template_yaml",
                         lambda text: text.replace("load_component", "load_componnt"),
                         "has no function 'load_componnt'"),
    "broken template": ("_tiny_mc_template_yaml",
                        lambda text: text.replace("{{question}}", "{{question"),
                        "TemplateSyntaxError"),
    "unknown key": ("_tiny_mc_template_yaml",
                    lambda text: text.replace("metric_list", "metrc_list"), "metrc_list"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(BROKEN_TASK_FILES))
def test_a_broken_task_yaml_is_found_before_training(kind: str, tmp_path: Path) -> None:
    """A copy of the task folders (HYDRABENCH_TASKS_DIR, read when hydrabench starts: a process)
    with one file broken; `run` stops before training, naming the task and the file."""
    name, breaking, words = BROKEN_TASK_FILES[kind]
    shutil.copytree(REPO / "tasks", tmp_path / "tasks")
    broken = tmp_path / "tasks" / "tiny" / name
    broken.write_text(breaking(broken.read_text()))
    env = child_env(tmp_path / "results", HYDRABENCH_TASKS_DIR=str(tmp_path / "tasks"),
                    OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "hydrabench.cli", *RUN[:3], "--task", "medical"],
                          env=env, capture_output=True, text=True, timeout=600)
    errors = error_lines(done.stderr)
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert "tiny_medical" in errors[0] and words in errors[0] and str(tmp_path) in errors[0]
    assert "training" not in done.stderr and not (tmp_path / "results").exists()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real full disk: a 64 KiB tmpfs, big enough for the run's folders and locks, too small for
    a training checkpoint."""
    with mounted_tmpfs(tmp_path / "disk", "64k") as disk:
        yield disk


def test_a_full_disk_while_checkpointing_is_one_line_naming_the_checkpoint(
        small_disk: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(small_disk / "results"))
    assert main(["run", "--method", "lora", "--task", "medical", "--max-steps", "2",
                 "--checkpoint-every", "1", "--limit", "2"]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1, errors
    assert "ckpt.pt: No space left on device" in errors[0] and str(small_disk) in errors[0]


def test_a_misspelt_lm_eval_task_is_refused_before_the_base_model_is_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """On a fresh machine the tiny base model is built (minutes) when a run first reads it: a
    task name lm-eval does not know is refused before that, not after."""
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("HYDRABENCH_CACHE", str(tmp_path / "cache"))
    assert_refused_in_one_line(["eval", "--model", "builtin:tiny", "--task", "tiny_mdical"],
                               "unknown lm-eval task", tmp_path / "results", capsys)
    assert not list(tmp_path.glob("cache/**/*.safetensors"))


def test_an_lm_eval_task_that_runs_code_needs_the_opt_in_and_is_taken_with_it() -> None:
    """`eval --task tiny_code` (lm-eval's name, not the profile's column) and `eval --run RUN
    --task tiny_code` are refused without --allow-code-execution, before any work, and run
    with it (the opt-in of the command line, or of the run being scored again)."""
    from hydrabench.errors import SpecError
    from hydrabench.pipeline.resolve import resolve_spec, retarget

    with pytest.raises(SpecError, match="opt in with --allow-code-execution"):
        resolve_spec("base", "tiny_code", lm_eval_task_ok=True)
    allowed = {"eval": {"allow_code_execution": True}}
    assert resolve_spec("base", "tiny_code", overrides=allowed, lm_eval_task_ok=True
                        ).eval_tasks == ("tiny_code",)
    trained = resolve_spec("lora", "medical")
    with pytest.raises(SpecError, match="opt in with --allow-code-execution"):
        retarget(trained, "tiny_code", {})
    for opted_in, overrides in ((trained, allowed["eval"]),
                                (resolve_spec("lora", "medical", overrides=allowed), {})):
        scored = retarget(opted_in, "tiny_code", overrides)
        assert scored.eval_tasks == ("tiny_code",) and scored.eval.allow_code_execution
        assert scored.train_id == trained.train_id
