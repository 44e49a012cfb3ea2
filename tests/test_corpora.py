"""Training corpora: each loader on the real local copies in ../shared/data; malformed files."""

from pathlib import Path

import pytest
from conftest import SHARED

from hydrabench.data import synthetic
from hydrabench.data.corpora import load_corpus
from hydrabench.data.records import InstructionRecord, render_prompt
from hydrabench.errors import SpecError

DATA = SHARED / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not present")


@needs_data
@pytest.mark.parametrize(("corpus", "count", "first_words"), [
    ("data:genmedgpt_5k/chatdoctor5k.json", 5452, "If you are a doctor"),
    ("data:gsm8k/train.jsonl", 7473, "Natalia sold clips"),
    # 2 of the 2017 CodeAlpaca records have an empty output and are skipped
    ("data:codealpaca/code_alpaca_2k.json", 2015, "What are the distinct values"),
    ("data:hydralora_example/train.json", 1565, "Read the following document"),
])
def test_local_copies_load_as_instruction_records(corpus: str, count: int, first_words: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(DATA))
    records = load_corpus(corpus)
    assert len(records) == count
    assert records[0].instruction.startswith(first_words)
    assert all(r.instruction and r.output for r in records)


@needs_data
def test_gsm8k_answer_keeps_its_final_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(DATA))
    record = load_corpus("data:gsm8k/train.jsonl")[0]
    assert record.output.endswith("#### 72")


def test_corpora_join_with_plus(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"instruction": "x", "output": "y"}\n')
    b.write_text('{"question": "q", "answer": "z"}\n')
    assert [r.output for r in load_corpus(f"{a}+{b}")] == ["y", "z"]


def test_synthetic_mixture_is_interleaved_and_labelled() -> None:
    records = load_corpus("synthetic")
    assert len(records) == 300 * len(synthetic.COMPONENTS)
    assert [r.component for r in records[:6]] == list(synthetic.COMPONENTS)


def test_alpaca_template_matches_the_reference_scripts() -> None:
    prompt = render_prompt(InstructionRecord("Add 2 and 3.", "5", input="2, 3"), "alpaca")
    assert prompt.endswith("### Instruction:\nAdd 2 and 3.\n\n### Input:\n2, 3\n\n### Response:\n")


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": oops}\n',
     r"malformed JSONL at .*bad\.jsonl:2"),
    ("bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": }]',
     r"malformed JSON at .*bad\.json:2"),
    ("nofield.jsonl", '{"instruction": "a"}\n', r"nofield\.jsonl:1: record has no output field"),
    ("empty.jsonl", "\n", "is empty"),
    ("table.tsv", "a\tb\n", "unsupported corpus format"),
])
def test_malformed_corpus_names_file_and_line(tmp_path: Path, name: str, content: str,
                                              message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SpecError, match=message):
        load_corpus(str(path))


def test_missing_local_copy_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYDRABENCH_DATA_DIR", raising=False)
    with pytest.raises(SpecError, match="needs HYDRABENCH_DATA_DIR"):
        load_corpus("data:gsm8k/train.jsonl")
