# ruff: noqa: F811 (the fixtures spec and results are test_hostile_records', used by name)
"""Corpora and records are data (issue 32): each malformed one, planted the way a hostile tester
plants it (a valid file or record with one field changed), is one line naming the file, exit 2,
nothing written under results/ and no traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import assert_refused_in_one_line
from test_hostile_records import STORIES, other_run, plant, refused, results, spec, valid_record  # noqa: F401

from hydrabench.cli import main
from hydrabench.config.spec import RunSpec
from hydrabench.pipeline.resolve import resolve_spec
from hydrabench.records.store import RunStore

GOOD = [{"instruction": "What is the capital of France?", "output": "Paris"},
        {"instruction": "What is the capital of Peru?", "output": "Lima"}]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(f'{{"instruction": "{r["instruction"]}", "output": "{r["output"]}"}}\n'
                   for r in rows).encode()


def good_parquet(path: Path) -> bytes:
    pd.DataFrame(GOOD).to_parquet(path)
    return path.read_bytes()


# name → (the corpus file's bytes, made from a valid one with one thing changed; the message).
CORPORA = {
    "binary.jsonl": (lambda p: b"\x00\x01\xff\xfe" + jsonl(GOOD), "is not UTF-8 text (byte 2"),
    "latin1.jsonl": (lambda p: jsonl(GOOD).replace(b"France", b"Fran\xe7e"),
                     "is not UTF-8 text (byte 44"),
    "surrogate.jsonl": (lambda p: jsonl(GOOD).replace(b"Paris", b"Par\\ud800is"),
                        "surrogate.jsonl:1: output holds '\\ud800', a lone surrogate"),
    "surrogate.json": (lambda p: b'[{"instruction": "a\\udc00", "output": "b"}]',
                       "surrogate.json record 0: instruction holds '\\udc00', a lone surrogate"),
    "corrupt.parquet": (lambda p: good_parquet(p)[:-40], "malformed parquet corpus file"),
    "quote.csv": (lambda p: b'instruction,output\n"What is the capital of France?,Paris\n',
                  "malformed CSV corpus file"),
    "fields.csv": (lambda p: b"instruction,output\nFrance?,Paris\nPeru?,Lima,Cuzco\n",
                   "Expected 2 fields in line 3, saw 3"),
    "binary.csv": (lambda p: b"instruction,output\nFrance?,Par\xffis\n",
                   "binary.csv is not UTF-8 text"),
    "empty_cell.csv": (lambda p: b"instruction,output\nFrance?,Paris\nPeru?,\n",
                       "empty_cell.csv:3: empty output cell"),
    "x.jsonl": (None, "x.jsonl is a directory, not a file"),
}


@pytest.mark.parametrize("name", list(CORPORA))
def test_an_own_corpus_that_is_not_a_corpus_is_one_line_before_training(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    make, message = CORPORA[name]
    corpus = tmp_path / name
    if make is None:
        corpus.mkdir()
    else:
        corpus.write_bytes(make(corpus))
    profile = tmp_path / "mine.yaml"
    profile.write_text(f"extends: tiny\ntasks: {{mine: {{corpus: {corpus}, "
                       "eval: [tiny_facts]}}\n")
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    assert_refused_in_one_line(["run", "--method", "lora", "--task", "mine", "--profile",
                                str(profile)], message, tmp_path / "results", capsys)


# -- records: a valid one (as the runner writes it) with one field changed ----------------------


def corrupted(spec: RunSpec, change: Callable[[dict, str], Any]) -> dict[str, Any]:
    record = valid_record(spec)
    change(record, spec.eval_tasks[0])
    return record


PLANTED_RECORDS = {
    "value NaN": (lambda r, t: r["metrics"][t].update(value=float("nan")),
                  "acc,none is nan, not a finite number"),
    "a metric inf": (lambda r, t: r["metrics"][t]["metrics"].update({"acc,none": float("inf")}),
                     "acc,none is inf, not a finite number"),
    "a stderr NaN": (lambda r, t: r["metrics"][t]["stderr"].update({"acc,none": float("nan")}),
                     "the stderr of acc,none is nan"),
    "n = -5": (lambda r, t: r["metrics"][t].update(n=-5), "n is -5, not >= 0"),
    "acc = 7.0": (lambda r, t: r["metrics"][t].update(value=7.0),
                  "acc,none is 7.0, outside [0, 1]"),
    "seed -1": (lambda r, t: r.update(seed=-1), "seed is -1, not >= 0"),
    "spec.inputs not an object": (lambda r, t: r["spec"].update(inputs=5),
                                  "spec: inputs is missing or not of type dict"),
}


def plant_at(results: Path, folder: str, record: dict[str, Any]) -> Path:
    """`record` as runs/<folder>/record.json (NaN written as JSON's NaN, as Python writes it)."""
    path = RunStore(results).record_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    RunStore(results).artifact_dir(record["train_id"]).mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("kind", [*PLANTED_RECORDS, "run id of another folder"])
def test_a_record_with_values_no_run_gives_is_corrupt(
        kind: str, spec: RunSpec, results: Path, capsys: pytest.CaptureFixture) -> None:
    """show refuses it in one line, list runs leaves it out saying so, compare refuses it."""
    other = other_run(spec, results)
    if kind == "run id of another folder":  # a colleague's record copied into another run's folder
        record, message = valid_record(other), f"its run_id {other.run_id!r} is not its folder"
    else:
        change, message = PLANTED_RECORDS[kind]
        record = corrupted(spec, change)
    path = plant_at(results, spec.run_id, record)
    refused(["show", spec.run_id], f"corrupt record {path}: ", results, capsys)
    refused(["show", spec.run_id], message, results, capsys)
    refused(["compare", spec.run_id, other.run_id], f"corrupt record {path}: ", results, capsys)
    assert main(["list", "runs"]) == 0
    out, err = capsys.readouterr()
    assert other.run_id in out and spec.run_id not in out
    assert f"corrupt record {path}: " in err and message in err


def test_list_runs_shows_a_record_that_names_no_column_task(
        spec: RunSpec, results: Path, capsys: pytest.CaptureFixture) -> None:
    record = valid_record(spec)
    record["column_tasks"] = []  # as the smallest hand-written records have it
    plant(results, record)
    capsys.readouterr()
    assert main(["list", "runs"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if spec.run_id in x]
    assert line.split()[4] == "?"  # no column, no score (not a division by zero)


@pytest.mark.parametrize("whose", ["base", "own"])
def test_a_record_without_spec_inputs_is_no_baseline(
        whose: str, spec: RunSpec, results: Path, capsys: pytest.CaptureFixture) -> None:
    """A record from before the content fingerprints: the base row's is not taken as the
    baseline of a run, nor is a run's own matched to one (no KeyError after the record is
    written)."""
    from hydrabench.records.store import base_record

    base_spec = resolve_spec("base", "medical", model=str(STORIES))
    base, mine = valid_record(base_spec), valid_record(spec)
    base["training"] = {"trained": False}
    base.update(artifact=None, train_id=base_spec.train_id)
    del (base if whose == "base" else mine)["spec"]["inputs"]  # planted
    plant(results, base)
    plant(results, mine)
    store = RunStore(results)
    assert base_record(store, store.load(spec.run_id)) is None
    mine["spec"]["inputs"] = spec.to_dict()["inputs"]
    base["spec"]["inputs"] = base_spec.to_dict()["inputs"]
    plant(results, base)
    plant(results, mine)
    assert base_record(store, store.load(spec.run_id)).run_id == base_spec.run_id  # whole: found


# -- compare over per-sample outputs: lm-eval's rows, one field changed -------------------------


def samples(results: Path, run_id: str, task: str, values: list[Any]) -> Path:
    """runs/<run id>/lm_eval/samples_<task>.jsonl with one row per document, as lm-eval writes."""
    path = RunStore(results).run_dir(run_id) / "lm_eval" / f"samples_{task}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"doc_id": i, "doc_hash": f"h{i}", "filter": "none",
                                        "acc": v}) + "\n" for i, v in enumerate(values)))
    return path


SAMPLES = {
    "a cut line": (lambda text: text[:-20], "corrupt per-sample outputs in"),
    "no doc_hash": (lambda text: text.replace('"doc_hash": "h2", ', ""),
                    "a row without its doc_id and doc_hash"),
    "a string metric": (lambda text: text.replace('"h2", "filter": "none", "acc": 1.0',
                                                  '"h2", "filter": "none", "acc": "1.0"'),
                        "acc of document 2 is '1.0', not a number"),
    "a pair metric": (lambda text: text.replace('"acc": 0.0}', '"acc": [0, 1]}', 1),
                      "is [0, 1], not a number"),
}


@pytest.mark.parametrize("kind", SAMPLES)
def test_compare_over_broken_per_sample_outputs_is_one_line(
        kind: str, spec: RunSpec, results: Path, capsys: pytest.CaptureFixture) -> None:
    other = other_run(spec, results)
    plant(results, valid_record(spec))
    task = spec.eval_tasks[0]
    samples(results, other.run_id, task, [1.0, 0.0, 1.0, 1.0])
    path = samples(results, spec.run_id, task, [1.0, 0.0, 1.0, 0.0])
    change, message = SAMPLES[kind]
    path.write_text(change(path.read_text()))
    refused(["compare", spec.run_id, other.run_id], message, results, capsys)



def test_lm_eval_s_nan_is_not_measured_so_the_record_stays_valid() -> None:
    """lm-eval writes NaN for a stderr of one item (and a nanmean of nothing); a record refuses
    NaN, so the scores keep such values as not measured instead of making every rerun fail."""
    from hydrabench.evaluation.harness import _scores

    (score,) = _scores({"results": {"t": {"acc,none": 1.0, "acc_stderr,none": float("nan"),
                                          "f1,none": float("nan")}},
                        "n-samples": {"t": {"effective": 1}}}).values()
    assert score.metrics == {"acc,none": 1.0} and score.stderr == {"acc,none": None}
