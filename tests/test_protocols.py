"""`hydrabench protocols` on the small local model and real MMLU: every protocol's per-item
choice equals an independent plain-transformers computation of that protocol."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import SHARED

from hydrabench.cli import main
from hydrabench.paths import TASKS_DIR
from hydrabench.reports.protocols import PROTOCOLS, protocol_task_folders

MODEL = SHARED / "models" / "stories260K"
DATA = SHARED / "data"
LIMIT = 2
LETTERS = "ABCD"

pytestmark = pytest.mark.skipif(not MODEL.exists() or not (DATA / "mmlu").exists(),
                                reason="needs ../shared (stories260K, MMLU)")


def mmlu_rows(subject: str, split: str) -> list[dict[str, str]]:
    with open(DATA / "mmlu" / split / f"{subject}_{split}.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def subjects() -> list[str]:
    return sorted(p.name.removesuffix("_test.csv") for p in (DATA / "mmlu" / "test").glob("*.csv"))


class Scorer:
    """The small model in plain transformers, unbatched, float32."""

    def __init__(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(MODEL)
        self.model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
        self.max_length = self.model.config.max_position_embeddings

    @torch.no_grad()
    def log_probs(self, ids: list[int]) -> torch.Tensor:
        """log p(ids[i + 1] | ids[:i + 1]) for every i."""
        logits = self.model(torch.tensor([ids])).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]

    def letter_choice(self, context: str, continuations: list[str]) -> int:
        """lm-eval's reading: log-likelihood of each continuation after the context (the
        tokenizer's BOS first, the context cut on the left to fit), the most likely wins."""
        scores = []
        context_ids = self.tok(context)["input_ids"]
        for continuation in continuations:
            whole = self.tok(context + continuation)["input_ids"]
            cont = whole[len(context_ids):]
            window = (context_ids + cont)[-(self.max_length + 1):]
            scores.append(float(self.log_probs(window)[-len(cont):].sum()))
        return scores.index(max(scores))

    def perplexity_choice(self, prompts: list[str]) -> int:
        """OpenCompass's PPL reading: each whole prompt tokenized with BOS, right-truncated at
        the model's length, mean cross-entropy over its tokens (divided by all of them, BOS
        included, as get_ppl's `lens`); the lowest wins, the first on a tie."""
        ppl = []
        for prompt in prompts:
            ids = self.tok(prompt, truncation=True, max_length=self.max_length)["input_ids"]
            ppl.append(float(-self.log_probs(ids).sum()) / len(ids))
        return ppl.index(min(ppl))


def question(row: dict[str, str], strip: bool) -> str:
    text = row["question"].strip() if strip else row["question"]
    return text + "".join(f"\n{letter}. {row[f'choice{i}']}" for i, letter in enumerate(LETTERS))


def lm_eval_choice(scorer: Scorer, subject: str, row: dict[str, str], shots: int) -> int:
    """lm-eval's mmlu/default: description, shots as "question\\nAnswer: X" + blank line."""
    name = subject.replace("_", " ")
    context = f"The following are multiple choice questions (with answers) about {name}.\n\n"
    for example in mmlu_rows(subject, "dev")[:shots]:
        context += f"{question(example, True)}\nAnswer: {LETTERS[int(example['answer'])]}\n\n"
    context += f"{question(row, True)}\nAnswer:"
    return scorer.letter_choice(context, [f" {letter}" for letter in LETTERS])


def opencompass_choice(scorer: Scorer, subject: str, row: dict[str, str], shots: int) -> int:
    """mmlu_ppl_ac766d: hint (two spaces), examples joined by "\\n" plus a final "\\n"."""
    hint = ("The following are multiple choice questions (with answers) about  "
            f"{subject.replace('_', ' ')}.\n\n")
    examples = [f"{question(e, False)}\nAnswer: {LETTERS[int(e['answer'])]}\n"
                for e in mmlu_rows(subject, "dev")[:shots]]
    ice = "\n".join(examples) + "\n" if examples else ""
    return scorer.perplexity_choice([f"{hint}{ice}{question(row, False)}\nAnswer: {letter}"
                                     for letter in LETTERS])


def choices_from_samples(directory: Path, perplexity: bool) -> dict[tuple[str, int], int]:
    """The choice lm-eval's per-sample outputs imply: the highest log-likelihood, or for the
    perplexity reading the lowest -log-likelihood per token counted."""
    found = {}
    for path in directory.glob("samples_mmlu_*.jsonl"):
        subject = path.stem.removeprefix("samples_mmlu_")
        for line in path.read_text().splitlines():
            row = json.loads(line)
            lls = [resp[0] for resp in row["filtered_resps"]]
            if perplexity:
                values = [-ll / n for ll, n in zip(lls, row["doc"]["ppl_tokens"], strict=True)]
                pick = values.index(min(values))
            else:
                pick = lls.index(max(lls))
            assert row["acc"] == float(pick == row["doc"]["answer"])
            found[(subject, row["doc_id"])] = pick
    return found


@pytest.mark.slow
def test_protocols_table_and_every_choice_matches_plain_transformers(
        store_env: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(DATA))
    assert main(["protocols", "--model", str(MODEL), "--limit", str(LIMIT)]) == 0
    paths = [Path(p) for p in capsys.readouterr().out.split()]
    assert [p.suffix for p in paths] == [".md", ".csv", ".tex"]
    frame = pd.read_csv(paths[1])
    assert list(frame["kind"]).count("score") == 4 and list(frame["kind"]).count("paired Δ") == 6
    external = frame[frame["kind"] == "external figure"]
    assert sorted(external["value"]) == [38.88, 38.89, 40.12, 45.3, 46.78]
    assert external["source"].str.contains("#16").any()
    assert "external figure" in paths[0].read_text()

    scorer = Scorer()
    readings = {"lm-eval-0shot": (lm_eval_choice, 0), "lm-eval-5shot": (lm_eval_choice, 5),
                "opencompass-ppl-0shot": (opencompass_choice, 0),
                "opencompass-ppl-5shot": (opencompass_choice, 5)}
    root = store_env / "results" / "protocols" / f"protocols-mmlu-stories260K-limit{LIMIT}"
    for name, (reading, shots) in readings.items():
        ours = choices_from_samples(root / name, perplexity=name.startswith("opencompass"))
        expected = {(subject, i): reading(scorer, subject, row, shots)
                    for subject in subjects()
                    for i, row in enumerate(mmlu_rows(subject, "test")[:LIMIT])}
        assert ours.keys() == expected.keys(), name
        differ = sorted(k for k in expected if ours[k] != expected[k])
        assert not differ, (name, differ)
        right = [expected[(s, i)] == int(mmlu_rows(s, "test")[i]["answer"]) for s, i in expected]
        (score,) = frame[(frame["kind"] == "score")
                         & (frame["label"] == PROTOCOLS[name].label)]["value"]
        assert score == pytest.approx(100 * sum(right) / len(right)), name


def test_unknown_protocol_is_one_line_and_writes_nothing(
        store_env: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(DATA))
    assert main(["protocols", "--model", str(MODEL), "--protocols", "lm-eval-3shot"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'lm-eval-5shot'" in err[0]
    assert main(["protocols", "--model", str(MODEL), "--benchmark", "gsm8k"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    monkeypatch.delenv("HYDRABENCH_DATA_DIR")  # and conftest switches the hub off
    assert main(["protocols", "--model", str(MODEL)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set HYDRABENCH_DATA_DIR" in err[0]
    assert not (store_env / "results").exists() and not (store_env / "reports").exists()


def tasks_of_every_protocol(limit: int) -> dict[str, dict]:
    """Each protocol's group as lm-eval builds it from the folders `hydrabench protocols`
    indexes now (offline or hub), with the metadata it passes."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in protocol_task_folders()],
                          include_defaults=False,
                          metadata={"tokenizer": str(MODEL), "max_length": 512, "limit": limit})
    return {p.task: manager.load(p.task) for p in PROTOCOLS.values()}


# What a task's prompt and score are made of; the data source (dataset_path, dataset_kwargs,
# custom_dataset) is what may differ between the hub and the offline tasks.
TEMPLATE_KEYS = ("output_type", "test_split", "fewshot_split", "fewshot_config", "num_fewshot",
                 "description", "doc_to_text", "doc_to_target", "doc_to_choice",
                 "target_delimiter", "fewshot_delimiter", "metric_list", "process_results")


@pytest.mark.slow
def test_hub_protocol_tasks_are_the_offline_ones_over_cais_mmlu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not offline, `protocols` scores tasks/hub/mmlu_protocols: the same groups, subjects,
    templates, metrics and (on the same data) requests as tasks/offline/mmlu_protocols, read
    from cais/mmlu. No internet here, so datasets.load_dataset is replaced by the local copy of
    the dataset asked for (the only stand-in in this test)."""
    import datasets

    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(DATA))
    assert protocol_task_folders() == [TASKS_DIR / "offline"]
    offline = tasks_of_every_protocol(limit=1)

    spec = importlib.util.spec_from_file_location(
        "hydrabench_offline_data", TASKS_DIR / "offline" / "hydrabench_offline_data.py")
    local = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local)
    subjects = [name.removeprefix("mmlu_") for name in offline["mmlu_lm_eval_0shot"]["tasks"]]
    copies = {subject: local.load(benchmark="mmlu", subject=subject) for subject in subjects}
    fetched = []

    def hub_stand_in(path: str, name: str | None = None, **kwargs) -> datasets.DatasetDict:
        fetched.append((path, name))
        return copies[name]

    monkeypatch.setattr(datasets, "load_dataset", hub_stand_in)
    for variable in ("HYDRABENCH_DATA_DIR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    assert protocol_task_folders()[-1] == TASKS_DIR / "hub" / "mmlu_protocols"
    hub = tasks_of_every_protocol(limit=1)

    for group, built in hub.items():
        assert sorted(built["tasks"]) == sorted(offline[group]["tasks"]), group
        assert len(built["tasks"]) == 57
        assert (built["groups"][group].aggregate_metric_list
                == offline[group]["groups"][group].aggregate_metric_list)
        for name, task in built["tasks"].items():
            twin = offline[group]["tasks"][name]
            for key in TEMPLATE_KEYS:
                mine, theirs = getattr(task.config, key), getattr(twin.config, key)
                if callable(mine):  # a utils.py function: the same file and name
                    mine, theirs = ((f.__code__.co_filename, f.__name__) for f in (mine, theirs))
                assert mine == theirs, (group, name, key)
            for one in (task, twin):
                one.build_all_requests(limit=1)
            assert ([i.arguments for i in task.instances]
                    == [i.arguments for i in twin.instances]), (group, name)
    assert sorted(fetched) == sorted(("cais/mmlu", s) for s in subjects for _ in PROTOCOLS)


@pytest.mark.slow
def test_protocols_of_a_run_score_its_adapter(store_env: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`--run RUN` scores the run's trained artifact on its base model, labelled by the run."""
    from hydrabench.records.store import RunStore

    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(DATA))
    assert main(["run", "--model", str(MODEL), "--method", "lora", "--task", "general",
                 "--max-steps", "2", "--limit", "2"]) == 0
    (record,) = RunStore().records()
    capsys.readouterr()
    assert main(["protocols", "--run", record.run_id, "--limit", "1",
                 "--protocols", "lm-eval-0shot,opencompass-ppl-0shot"]) == 0
    frame = pd.read_csv(Path(capsys.readouterr().out.split()[1]))
    scores = frame[frame["kind"] == "score"]
    assert list(scores["model"]) == [f"run {record.run_id}"] * 2 and list(scores["n"]) == [57, 57]
    assert main(["protocols", "--run", "no-such-run"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
