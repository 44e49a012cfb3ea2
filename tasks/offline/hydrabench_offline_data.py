"""Dataset loaders for the offline lm-eval tasks in this folder.

Every offline task includes `_offline_dataset_yaml`, which sets lm-eval's `custom_dataset` to
`load`. lm-eval then calls `load(**metadata, **dataset_kwargs)` instead of
`datasets.load_dataset`, so the benchmark files are read from the directory named by the
environment variable HYDRABENCH_DATA_DIR (layout: /work/shared/data/MANIFEST.md) and nothing is
fetched from the HF hub.

Each loader returns the split names and column names of the hub dataset that lm-eval's built-in
task reads, so the task YAMLs can keep the built-in prompts, targets and filters unchanged.
"""

import csv
import gzip
import json
import os
from pathlib import Path

import datasets

DATA_DIR_ENV = "HYDRABENCH_DATA_DIR"


def data_file(relative_path: str) -> Path:
    """Return $HYDRABENCH_DATA_DIR/relative_path, or raise one error that says what is missing."""
    root = os.environ.get(DATA_DIR_ENV)
    if root and (path := Path(root) / relative_path).is_file():
        return path
    state = f"it is {root!r}" if root else "it is unset"
    raise FileNotFoundError(
        f"{DATA_DIR_ENV}/{relative_path} not found (set {DATA_DIR_ENV} to a copy of the "
        f"benchmark files; {state})"
    )


def _read_rows(relative_path: str, delimiter: str) -> list[dict[str, str]]:
    # The csv module keeps every field as the exact string in the file (pandas would turn
    # answers such as "None" or "NA" into NaN).
    with data_file(relative_path).open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def _read_jsonl(relative_path: str) -> list[dict]:
    with data_file(relative_path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _mmlu(subject: str, **_metadata) -> datasets.DatasetDict:
    """cais/mmlu schema: question, subject, choices (4 strings), answer (0-3)."""

    def split(name: str) -> datasets.Dataset:
        rows = _read_rows(f"mmlu/{name}/{subject}_{name}.csv", delimiter=",")
        return datasets.Dataset.from_list(
            [
                {
                    "question": row["question"],
                    "subject": subject,
                    "choices": [row[f"choice{i}"] for i in range(4)],
                    "answer": int(row["answer"]),
                }
                for row in rows
            ]
        )

    return datasets.DatasetDict({"test": split("test"), "dev": split("dev")})


def _gsm8k(**_metadata) -> datasets.DatasetDict:
    """openai/gsm8k "main" schema: question, answer (that dataset holds these same files)."""
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_list(_read_jsonl(f"gsm8k/{name}.jsonl"))
            for name in ("train", "test")
        }
    )


def _bbh(task: str, **_metadata) -> datasets.DatasetDict:
    """SaylorTwift/bbh schema: input, target."""
    examples = json.loads(data_file(f"bbh/bbh/{task}.json").read_text(encoding="utf-8"))["examples"]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(examples)})


def _medqa_4options(**_metadata) -> datasets.DatasetDict:
    """GBaker/MedQA-USMLE-4-options-hf schema (sent1, ending0-3, label), the columns read by the
    built-in `preprocess_medqa` functions. Only the test split exists offline."""
    rows = _read_jsonl("medqa/test.jsonl")
    return datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_list(
                [
                    {
                        "sent1": row["question"],
                        **{f"ending{i}": row["options"][letter] for i, letter in enumerate("ABCD")},
                        "label": "ABCD".index(row["answer_idx"]),
                    }
                    for row in rows
                ]
            )
        }
    )


def _legalbench_early(task: str, **_metadata) -> datasets.DatasetDict:
    """The early-release TSV columns plus `prompt`: the task's base_prompt.txt with every
    {{column}} replaced by the row's value, as LegalBench's own prompt generation does."""
    template = data_file(f"legalbench_early/{task}/base_prompt.txt").read_text(encoding="utf-8")
    rows = _read_rows(f"legalbench_early/{task}/test.tsv", delimiter="\t")
    for row in rows:
        prompt = template
        for column, value in row.items():
            prompt = prompt.replace("{{" + column + "}}", value)
        row["prompt"] = prompt
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _humaneval(**_metadata) -> datasets.DatasetDict:
    """openai/openai_humaneval schema: task_id, prompt, canonical_solution, test, entry_point
    (that dataset holds this same file)."""
    with gzip.open(data_file("humaneval/HumanEval.jsonl.gz"), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


_LOADERS = {
    "mmlu": _mmlu,
    "gsm8k": _gsm8k,
    "bbh": _bbh,
    "medqa_4options": _medqa_4options,
    "legalbench_early": _legalbench_early,
    "humaneval": _humaneval,
}


def load(benchmark: str, **kwargs) -> datasets.DatasetDict:
    """lm-eval `custom_dataset` entry point.

    kwargs hold the task's dataset_kwargs (`subject` or `task`) and also the task metadata
    (version, config_source, model_args ...), which lm-eval passes too; the loaders take what
    they need and ignore the rest as `**_metadata`.
    """
    return _LOADERS[benchmark](**kwargs)
