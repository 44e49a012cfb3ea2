"""`hydrabench protocols` on the small local model and real MMLU: every protocol's per-item
choice equals an independent plain-transformers computation of that protocol."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import SHARED

from hydrabench.cli import main
from hydrabench.protocols import PROTOCOLS

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
    assert not (store_env / "results").exists() and not (store_env / "reports").exists()
