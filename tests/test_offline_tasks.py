"""The offline lm-eval tasks in tasks/offline (see tasks/offline/README.md).

Each benchmark family runs end to end through lm-eval's HF backend on the real stories260K model
and the real benchmark files, and the prompt of doc 0 is checked byte for byte against a prompt
built here from the raw file. The configs are also checked against lm-eval's built-in tasks, so an
offline score is the score the built-in task would give on the same data.
"""

import csv
import json
import os
from pathlib import Path

# No internet here: make any accidental hub access fail at once instead of retrying. Set before
# lm_eval imports datasets / huggingface_hub, which read these variables on import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval
import pytest
from lm_eval.api.task import ConfigurableTask
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
MODEL_DIR = REPO.parent / "shared" / "models" / "stories260K"
OFFLINE_TASKS = REPO / "tasks" / "offline"
BUILTIN_TASKS = Path(lm_eval.__file__).parent / "tasks"
# The built-in folders the offline tasks mirror, and the offline names with no built-in twin.
BUILTIN_FOLDERS = ["mmlu/default", "gsm8k", "bbh/cot_fewshot", "bbh/fewshot", "medqa"]
# humaneval uses hydrabench's sandboxed metric; its parity is checked in test_humaneval_offline.
# The MMLU protocol groups (mmlu_protocols/) are hydrabench's own, not mirrors of built-ins.
OFFLINE_ONLY = ("legalbench_early", "hydrabench_", "humaneval", "mmlu_lm_eval_",
                "mmlu_opencompass_ppl_")
# Config keys that say where the data comes from; every other key must equal the built-in's.
# MedQA leaves out training/validation_split because only its test split exists offline.
DATA_SOURCE_KEYS = {
    "dataset_path",
    "dataset_name",
    "dataset_kwargs",
    "custom_dataset",
    "training_split",
    "validation_split",
}

pytestmark = pytest.mark.skipif(
    not (DATA_DIR.is_dir() and MODEL_DIR.is_dir()),
    reason=f"needs the benchmark files in {DATA_DIR} and the model in {MODEL_DIR}",
)


@pytest.fixture(scope="session")
def data_dir_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYDRABENCH_DATA_DIR", str(DATA_DIR))
        yield


@pytest.fixture(scope="session")
def offline_tm():
    # include_defaults=False: the offline tasks reuse the built-in names (see README).
    return TaskManager(include_path=str(OFFLINE_TASKS), include_defaults=False)


@pytest.fixture(scope="session")
def builtin_tm():
    # Only the mirrored built-in folders: indexing all of lm-eval's ~15k files takes ~10 s.
    folders = [str(BUILTIN_TASKS / f) for f in BUILTIN_FOLDERS]
    return TaskManager(include_path=folders, include_defaults=False)


@pytest.fixture(scope="session")
def hf_lm():
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(MODEL_DIR), batch_size=8)


@pytest.fixture
def evaluate(hf_lm, offline_tm, data_dir_env):
    def run(tasks: list[str], limit: int, **kwargs) -> dict:
        return lm_eval.simple_evaluate(
            model=hf_lm,
            tasks=tasks,
            task_manager=offline_tm,
            limit=limit,
            log_samples=True,
            bootstrap_iters=0,
            **kwargs,
        )

    return run


def check_run(out: dict, task: str, metric_keys: list[str], limit: int) -> str:
    """Assert the metrics and sample count of `task`; return the context of doc 0."""
    for key in metric_keys:
        assert 0.0 <= out["results"][task][key] <= 1.0, (task, key)
    samples = out["samples"][task]
    # One logged sample per doc and filter (gsm8k has two filters).
    assert len({s["doc_id"] for s in samples}) == limit == out["n-samples"][task]["effective"]
    first = min(samples, key=lambda s: s["doc_id"])
    return first["arguments"][0][0]


def first_row(relative_path: str, delimiter: str = ",") -> dict[str, str]:
    with (DATA_DIR / relative_path).open(encoding="utf-8", newline="") as f:
        return next(csv.DictReader(f, delimiter=delimiter))


def first_jsonl(relative_path: str) -> dict:
    with (DATA_DIR / relative_path).open(encoding="utf-8") as f:
        return json.loads(f.readline())


def cot_prompt(task: str) -> tuple[str, list[tuple[str, str]]]:
    """Description and (input, chain-of-thought target) exemplars of bbh/cot-prompts/<task>.txt."""
    text = (DATA_DIR / "bbh" / "cot-prompts" / f"{task}.txt").read_text(encoding="utf-8")
    description, *shots = text.split("\n-----\n")[-1].split("\n\nQ: ")
    exemplars = []
    for shot in shots:
        question, target = shot.split("\nA: Let's think step by step.")
        # The reasoning follows on a new line, or after one space (sports_understanding).
        exemplars.append((question, target[1:].rstrip("\n")))
    return description, exemplars


def test_mmlu(evaluate):
    out = evaluate(["mmlu_anatomy", "hydrabench_law"], limit=8)
    ctx = check_run(out, "mmlu_anatomy", ["acc,none"], limit=8)
    row = first_row("mmlu/test/anatomy_test.csv")
    options = "".join(f"{letter}. {row[f'choice{i}']}\n" for i, letter in enumerate("ABCD"))
    assert ctx == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        f"{row['question'].strip()}\n{options}Answer:"
    )
    for subject in ("professional_law", "international_law", "jurisprudence"):
        check_run(out, f"mmlu_{subject}", ["acc,none"], limit=8)
    assert 0.0 <= out["results"]["hydrabench_law"]["acc,none"] <= 1.0
    assert out["group_subtasks"]["hydrabench_law"] == [
        "mmlu_professional_law",
        "mmlu_international_law",
        "mmlu_jurisprudence",
    ]


def test_gsm8k(evaluate):
    out = evaluate(["gsm8k", "gsm8k_cot"], limit=4, gen_kwargs="max_gen_toks=16")
    metrics = ["exact_match,strict-match", "exact_match,flexible-extract"]
    question = first_jsonl("gsm8k/test.jsonl")["question"]

    *shots, last = check_run(out, "gsm8k", metrics, limit=4).split("\n\n")
    assert last == f"Question: {question}\nAnswer:" and len(shots) == 5
    # The 5 shots are drawn (with lm-eval's default seed) from the train split.
    with (DATA_DIR / "gsm8k" / "train.jsonl").open(encoding="utf-8") as f:
        train_questions = {json.loads(line)["question"] for line in f}
    for shot in shots:
        assert shot.removeprefix("Question: ").split("\nAnswer: ")[0] in train_questions

    *shots, last = check_run(out, "gsm8k_cot", metrics, limit=4).split("\n\n")
    assert last == f"Q: {question}\nA:" and len(shots) == 8


@pytest.mark.slow
def test_bbh(evaluate):
    task = "boolean_expressions"
    out = evaluate(
        [f"bbh_cot_fewshot_{task}", f"bbh_fewshot_{task}"], limit=8, gen_kwargs="max_gen_toks=16"
    )
    check_run(out, f"bbh_cot_fewshot_{task}", ["exact_match,get-answer"], limit=8)
    ctx = check_run(out, f"bbh_fewshot_{task}", ["exact_match,none"], limit=8)
    description, exemplars = cot_prompt(task)
    example = json.loads((DATA_DIR / "bbh" / "bbh" / f"{task}.json").read_text())["examples"][0]
    # The answer-only exemplars are the CoT ones cut to their final answer.
    shots = [f"Q: {q}\nA: {t.rsplit('So the answer is ', 1)[1][:-1]}" for q, t in exemplars]
    assert ctx == f"{description}\n\n" + "\n\n".join(shots) + f"\n\nQ: {example['input']}\nA:"


def test_bbh_exemplars_are_the_papers_cot_prompts():
    # The few-shot exemplars live in the task YAMLs (copied from the built-in ones); check them
    # against the original cot-prompts/*.txt of the BIG-Bench-Hard repository.
    paths = sorted((OFFLINE_TASKS / "bbh" / "cot_fewshot").glob("[!_]*.yaml"))
    assert len(paths) == 27
    for path in paths:
        cfg = load_yaml(path)
        description, exemplars = cot_prompt(cfg["dataset_kwargs"]["task"])
        assert cfg["description"] == description + "\n\n", path.name
        samples = [(s["input"], s["target"]) for s in cfg["fewshot_config"]["samples"]]
        assert samples == exemplars, path.name


def test_medqa(evaluate):
    out = evaluate(["medqa_4options"], limit=8)
    ctx = check_run(out, "medqa_4options", ["acc,none", "acc_norm,none"], limit=8)
    row = first_jsonl("medqa/test.jsonl")
    options = "".join(f"{letter}. {row['options'][letter]}\n" for letter in "ABCD")
    assert ctx == f"Question: {row['question']}\n{options}Answer:"
    assert out["samples"]["medqa_4options"][0]["target"] == "ABCD".index(row["answer_idx"])


def test_legalbench_early(evaluate):
    out = evaluate(["legalbench_early"], limit=2)
    assert 0.0 <= out["results"]["legalbench_early"]["acc,none"] <= 1.0
    assert len(out["group_subtasks"]["legalbench_early"]) == 11
    ctx = check_run(out, "legalbench_early_hearsay", ["acc,none"], limit=2)
    template = (DATA_DIR / "legalbench_early/hearsay/base_prompt.txt").read_text(encoding="utf-8")
    row = first_row("legalbench_early/hearsay/test.tsv", delimiter="\t")
    assert ctx == template.replace("{{text}}", row["text"])
    hearsay = out["samples"]["legalbench_early_hearsay"][0]
    assert [args[1] for args in hearsay["arguments"]] == [" Yes", " No"]


def _comparable(cfg: dict) -> dict:
    # Functions (MedQA's prompt) compare by qualified name: the built-in YAML and the offline one
    # may load the same module twice.
    return {
        key: f"{value.__module__}.{value.__qualname__}" if callable(value) else value
        for key, value in cfg.items()
        if key not in DATA_SOURCE_KEYS
    }


def test_configs_equal_builtin(offline_tm, builtin_tm):
    offline, builtin = offline_tm.task_index, builtin_tm.task_index
    mirrored = sorted(name for name in offline if not name.startswith(OFFLINE_ONLY))
    assert set(mirrored) <= set(builtin)
    for name in mirrored:
        entry, builtin_entry = offline[name], builtin[name]
        if entry.yaml_path is None:  # a tag: same member tasks
            assert entry.tags == builtin_entry.tags, name
            continue
        cfg, builtin_cfg = load_yaml(entry.yaml_path), load_yaml(builtin_entry.yaml_path)
        assert _comparable(cfg) == _comparable(builtin_cfg), name


@pytest.mark.parametrize(
    "name", ["mmlu_anatomy", "gsm8k", "gsm8k_cot", "bbh_cot_fewshot_snarks", "medqa_4options"]
)
def test_prompts_equal_builtin(name, offline_tm, builtin_tm, data_dir_env):
    """The built-in task config, fed the offline docs, renders the same prompts."""
    task = offline_tm.load([name])["tasks"][name]
    builtin_cfg = load_yaml(builtin_tm.task_index[name].yaml_path)
    data_source = {key: task.config[key] for key in DATA_SOURCE_KEYS}
    builtin = ConfigurableTask(config={**builtin_cfg, **data_source})
    for t in (task, builtin):
        t.set_fewshot_seed(1234)  # simple_evaluate's default fewshot seed
    n_shots = builtin_cfg.get("num_fewshot") or 0
    for doc in list(task.test_docs())[:3]:
        assert task.fewshot_context(doc, n_shots) == builtin.fewshot_context(doc, n_shots)
        assert task.doc_to_target(doc) == builtin.doc_to_target(doc)


def test_missing_data_dir_names_the_file(offline_tm, monkeypatch, tmp_path):
    monkeypatch.delenv("HYDRABENCH_DATA_DIR", raising=False)
    expected = r"HYDRABENCH_DATA_DIR/mmlu/test/anatomy_test\.csv not found .* it is unset"
    with pytest.raises(FileNotFoundError, match=expected):
        offline_tm.load(["mmlu_anatomy"])
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"HYDRABENCH_DATA_DIR/gsm8k/train\.jsonl"):
        offline_tm.load(["gsm8k"])


@pytest.fixture
def no_cached_datasets(monkeypatch, tmp_path):
    """Empty datasets and hub caches, HYDRABENCH_DATA_DIR unset, and any dataset loading an
    error: what a fresh clone offline has."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.delenv("HYDRABENCH_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def load_dataset(path, *args, **kwargs):
        raise AssertionError(f"{path} was loaded before the refusal")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return tmp_path / "datasets"


@pytest.mark.slow
def test_a_hub_dataset_is_cached_once_datasets_prepared_it(no_cached_datasets, monkeypatch):
    from hydrabench.evaluation.harness import uncached_hub_datasets

    monkeypatch.delenv("HF_HUB_OFFLINE")  # lm-eval's built-in tasks, which read the hub
    assert uncached_hub_datasets(["mmlu_anatomy", "tiny_facts"]) == {"mmlu_anatomy": "cais/mmlu"}
    (no_cached_datasets / "cais___mmlu" / "anatomy" / "0.0.0" / "0123abcd").mkdir(parents=True)
    assert uncached_hub_datasets(["mmlu_anatomy"]) == {}


QUICK_START = ["eval", "--model", str(MODEL_DIR), "--task", "mmlu_anatomy", "--limit", "20",
               "--json"]


@pytest.mark.parametrize(("flags", "why"), [
    ({}, "not reachable from here"),
    ({"HF_DATASETS_OFFLINE": "1"}, "offline by HF_DATASETS_OFFLINE=1"),
    ({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, "HYDRABENCH_DATA_DIR, but it is unset"),
], ids=["no flags", "datasets offline", "as make sets them"])
def test_the_quick_start_without_local_data_is_one_line_naming_the_data_dir(
        flags, why, no_cached_datasets, monkeypatch, tmp_path, capsys):
    """The README's eval offline, with no HYDRABENCH_DATA_DIR and nothing cached: one line
    naming HYDRABENCH_DATA_DIR, exit 2, before any hub access (no retries, no traceback). This
    machine has no internet; the hub's socket is refused here so that a machine with internet
    means the same."""
    import socket

    from conftest import error_lines

    from hydrabench.cli import main

    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    for flag, value in flags.items():
        monkeypatch.setenv(flag, value)

    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    assert main(QUICK_START) == 2
    stderr = capsys.readouterr().err
    (error,) = error_lines(stderr)
    assert why in error and "point HYDRABENCH_DATA_DIR at a copy of the benchmark files" in error
    assert "Traceback" not in stderr
    assert not (tmp_path / "results").exists()
