"""The offline HumanEval tasks (tasks/offline/humaneval) and the synthetic suite's tiny_code task.

HumanEval runs end to end through lm-eval's HF backend on the real stories260K model; the
configs are checked against lm-eval's built-in humaneval YAMLs; and the canonical solutions of
all HumanEval problems and all tiny_code problems score pass@1 = 1 through the tasks' own prompt,
target and metric, which shows the three fit together and the sandbox does not break real code.
The tiny model scores as it did before the sandbox's judge, and each of its verdicts is the one
the whole program's own run would give (how samples were scored before). Tests that run code
skip where the sandbox cannot start, with its reason.
"""

import os
from pathlib import Path

# No internet here: make any accidental hub access fail at once. Set before lm_eval imports
# datasets / huggingface_hub, which read these variables on import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval
import pytest
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from hydrabench import code_eval
from hydrabench.evaluation import sandbox

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA_DIR = SHARED / "data"
MODEL_DIR = SHARED / "models" / "stories260K"
OFFLINE_TASKS = REPO / "tasks" / "offline"
BUILTIN_HUMANEVAL = Path(lm_eval.__file__).parent / "tasks" / "humaneval"
MIRRORED = ["humaneval", "humaneval_64", "humaneval_instruct", "humaneval_64_instruct"]
# Keys that say where the data comes from: the only ones allowed to differ from the built-in.
DATA_SOURCE_KEYS = {"dataset_path", "dataset_kwargs", "custom_dataset"}

needs_data = pytest.mark.skipif(
    not (DATA_DIR / "humaneval" / "HumanEval.jsonl.gz").is_file(),
    reason=f"needs the benchmark files in {DATA_DIR}",
)
needs_model = pytest.mark.skipif(not MODEL_DIR.is_dir(), reason=f"needs the model in {MODEL_DIR}")
needs_sandbox = pytest.mark.skipif(sandbox.unavailable_reason() is not None,
                                   reason=str(sandbox.unavailable_reason()))
# pass@1 of the tiny model (greedy, 128 new tokens, every doc) with the sandbox before the judge,
# measured 2026-12-01: its completions are stories, not code. So on any subset of the docs too.
SCORES_BEFORE = {"humaneval": 0.0, "tiny_code": 0.0}


@pytest.fixture(scope="module")
def offline_tm() -> TaskManager:
    return TaskManager(include_path=[str(OFFLINE_TASKS)], include_defaults=False)


@pytest.fixture
def data_dir(monkeypatch):
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(DATA_DIR))


@pytest.fixture
def opted_in(monkeypatch):
    monkeypatch.setenv(sandbox.OPT_IN_ENV, "1")


def canonical_pass_at_1(task) -> float:
    """pass@1 of the docs' canonical solutions, through the task's prompt, target and metric."""
    docs = list(task.test_docs())
    assert all(task.doc_to_text(doc) == doc["prompt"] for doc in docs)
    # build_predictions is the tasks' filter (checked against the YAML in test_configs_*).
    predictions = code_eval.build_predictions([[d["canonical_solution"]] for d in docs], docs)
    references = [task.doc_to_target(doc) for doc in docs]
    return task._metric_fn_list["pass_at_k"](references, predictions, k=[1])["pass@1"]


def tiny_lm() -> HFLM:
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(MODEL_DIR), batch_size=4)


@needs_data
@needs_model
@needs_sandbox
def test_humaneval_through_lm_eval(offline_tm, data_dir, opted_in):
    lm = tiny_lm()
    kwargs = dict(model=lm, tasks=["humaneval"], task_manager=offline_tm, limit=3,
                  gen_kwargs="max_gen_toks=16", log_samples=True, bootstrap_iters=0)
    # lm-eval's own gate: a task marked unsafe_code is refused without the confirmation.
    with pytest.raises(ValueError, match="humaneval which is marked as unsafe"):
        lm_eval.simple_evaluate(**kwargs)

    out = lm_eval.simple_evaluate(**kwargs, confirm_run_unsafe_code=True)
    assert 0.0 <= out["results"]["humaneval"]["pass@1,create_test"] <= 1.0
    assert out["n-samples"]["humaneval"]["effective"] == 3
    sample = min(out["samples"]["humaneval"], key=lambda s: s["doc_id"])
    prompt = sample["doc"]["prompt"]
    assert sample["arguments"][0][0] == prompt
    # The filter prepends the prompt to the model's completion, as the built-in one does.
    assert sample["filtered_resps"][0] == [prompt + sample["resps"][0][0]]


@needs_data
@needs_sandbox
def test_all_humaneval_canonical_solutions_pass(offline_tm, data_dir, opted_in):
    task = offline_tm.load(["humaneval"])["tasks"]["humaneval"]
    assert len(task.test_docs()) == 164
    assert canonical_pass_at_1(task) == 1.0


@needs_sandbox
def test_tiny_code_canonical_solutions_pass_and_wrong_ones_fail(opted_in):
    tm = TaskManager(include_path=[str(REPO / "tasks" / "tiny")], include_defaults=False)
    task = tm.load(["tiny_code"])["tasks"]["tiny_code"]
    assert task.UNSAFE_CODE and task.config.generation_kwargs["max_gen_toks"] == 48
    assert canonical_pass_at_1(task) == 1.0
    docs = list(task.test_docs())[:6]  # a few suffice: each op and constant is checked
    predictions = code_eval.build_predictions([["    return x\n"]] * len(docs), docs)
    references = [task.doc_to_target(doc) for doc in docs]
    assert code_eval.pass_at_k(references, predictions, k=[1]) == {"pass@1": 0.0}


@pytest.mark.slow
@needs_data
@needs_model
@needs_sandbox
def test_tiny_model_scores_as_before(data_dir, opted_in):
    tm = TaskManager(include_path=[str(OFFLINE_TASKS), str(REPO / "tasks" / "tiny")],
                     include_defaults=False)
    out = lm_eval.simple_evaluate(
        model=tiny_lm(), tasks=list(SCORES_BEFORE), task_manager=tm, limit=20,
        gen_kwargs="max_gen_toks=128", log_samples=True, bootstrap_iters=0,
        confirm_run_unsafe_code=True)
    for task, before in SCORES_BEFORE.items():
        assert out["results"][task]["pass@1,create_test"] == before
        # Each verdict, and the canonical solution's, as the whole program's own run gives it.
        passes = 0
        for sample in out["samples"][task]:
            doc, target = sample["doc"], sample["target"]
            for program in (sample["filtered_resps"][0][0],
                            doc["prompt"] + doc["canonical_solution"]):
                judged = sandbox.run_program(program, target, timeout_s=code_eval.TIMEOUT_S)
                alone = sandbox.run_program(f"{program}\n{target}\n", timeout_s=code_eval.TIMEOUT_S)
                assert judged.passed == alone.passed, (program, judged.detail, alone.detail)
                passes += judged.passed
        assert passes == len(out["samples"][task]) == 20  # the canonical ones, not the model's


def _comparable(cfg: dict) -> dict:
    # A `!function` left unresolved is a path; the built-in and offline utils.py sit in different
    # folders, so compare the `module.function` part.
    def norm(value):
        if isinstance(value, dict):
            return {k: norm(v) for k, v in value.items()}
        if isinstance(value, list):
            return [norm(v) for v in value]
        return Path(value).name if isinstance(value, str) and value.startswith("/") else value

    return {key: norm(value) for key, value in cfg.items() if key not in DATA_SOURCE_KEYS}


@pytest.mark.parametrize("name", MIRRORED)
def test_configs_equal_builtin(name):
    # resolve_func=False: importing the built-in utils.py downloads code_eval from the hub.
    offline = load_yaml(OFFLINE_TASKS / "humaneval" / f"{name}.yaml", resolve_func=False)
    builtin = load_yaml(BUILTIN_HUMANEVAL / f"{name}.yaml", resolve_func=False)
    assert _comparable(offline) == _comparable(builtin)
    assert offline["dataset_kwargs"] == {"benchmark": "humaneval"}


def test_pass10_is_humaneval_64_with_20_samples():
    pass10 = load_yaml(OFFLINE_TASKS / "humaneval" / "humaneval_pass10.yaml", resolve_func=False)
    base = load_yaml(OFFLINE_TASKS / "humaneval" / "humaneval_64.yaml", resolve_func=False)
    changed = {"task", "repeats", "metric_list"}
    assert {k: v for k, v in pass10.items() if k not in changed} == {
        k: v for k, v in base.items() if k not in changed
    }
    assert pass10["repeats"] == 20 and pass10["metric_list"][0]["k"] == [1, 10]


def test_missing_data_file_names_it(offline_tm, monkeypatch, tmp_path):
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(tmp_path))
    expected = r"HYDRABENCH_DATA_DIR/humaneval/HumanEval\.jsonl\.gz not found"
    with pytest.raises(FileNotFoundError, match=expected):
        offline_tm.load(["humaneval"])
