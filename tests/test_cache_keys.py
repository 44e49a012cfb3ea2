"""Run ids and train ids over the content of every input: editing a corpus file, a task YAML or a
benchmark data file between runs retrains or re-scores, and each record names the fingerprints of
what actually trained and scored it. Real CLI processes, real lm-eval tasks, real data files."""

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, SHARED, finish, start

from hydrabench.pipeline.resolve import resolve_spec
from hydrabench.records import provenance

STORIES = SHARED / "models" / "stories260K"


def records_by_id(results: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in results.glob("runs/*/record.json")}


def run_once(args: list[str], results: Path, env: dict[str, str],
             monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict]:
    """`hydrabench ARGS` as a process; its log and the record it names."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # start() passes this process's environment on
    err = finish(start(args, results))
    (line,) = [line for line in err.splitlines() if "plan:" in line or "skipping" in line]
    run_id = line.split("] ", 1)[1].removeprefix("plan: ").split(":", 1)[0]
    return err, records_by_id(results)[run_id]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "data" / "mmlu").is_dir(), reason="needs ../shared/data")
def test_edits_to_corpus_task_yaml_and_benchmark_data_retrain_or_rescore(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tasks, data, results = tmp_path / "tasks", tmp_path / "data", tmp_path / "results"
    shutil.copytree(REPO / "tasks", tasks)
    shutil.copytree(SHARED / "data" / "mmlu", data / "mmlu")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"instruction": f"Add {i} and 2.", "output": str(i + 2)})
                              + "\n" for i in range(16)))
    profile = tmp_path / "mine.yaml"
    profile.write_text(f"extends: tiny\ntasks:\n  mine: {{corpus: {corpus}, "
                       "eval: [tiny_medical, mmlu_anatomy]}\n")
    env = {"HYDRABENCH_TASKS_DIR": str(tasks), "HYDRABENCH_DATA_DIR": str(data)}
    run = ["run", "--profile", str(profile), "--model", str(STORIES), "--method", "lora",
           "--task", "mine", "--max-steps", "2", "--limit", "2"]

    err, first = run_once(run, results, env, monkeypatch)
    assert "training lora" in err
    artifact = json.loads((results / first["artifact"] / "artifact.json").read_text())
    assert first["provenance"]["data_fingerprints"] == artifact["inputs"]["corpus"] == {
        str(corpus): provenance.fingerprint_path(corpus)}
    assert first["provenance"]["model_fingerprint"] == artifact["inputs"]["model"] == (
        provenance.model_fingerprint(str(STORIES)))
    err, again = run_once(run, results, env, monkeypatch)
    assert "finished record found, skipping" in err and again == first

    with corpus.open("a") as fh:  # the user edits the training file: train again
        fh.write(json.dumps({"instruction": "Add 40 and 2.", "output": "42"}) + "\n")
    err, retrained = run_once(run, results, env, monkeypatch)
    assert "training lora" in err
    assert retrained["train_id"] != first["train_id"]
    trained_on = retrained["provenance"]["data_fingerprints"][str(corpus)]
    assert trained_on == provenance.fingerprint_path(corpus)
    assert trained_on != first["provenance"]["data_fingerprints"][str(corpus)]

    yaml = tasks / "tiny" / "tiny_medical.yaml"  # a task config edit: score again, same training
    yaml.write_text(yaml.read_text() + "metadata: {edited: true}\n")
    err, rescored = run_once(run, results, env, monkeypatch)
    assert "training lora" not in err and "trained artifact found" in err
    assert rescored["train_id"] == retrained["train_id"]
    assert rescored["run_id"] != retrained["run_id"]
    before, after = (r["provenance"]["task_fingerprints"] for r in (retrained, rescored))
    assert after["tiny_medical"]["config"] != before["tiny_medical"]["config"]
    assert after["mmlu_anatomy"] == before["mmlu_anatomy"]

    answers = data / "mmlu" / "test" / "anatomy_test.csv"  # every answer of the benchmark moved
    with answers.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    with answers.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "answer": str((int(row["answer"]) + 1) % 4)} for row in rows)
    err, moved = run_once(run, results, env, monkeypatch)
    assert "training lora" not in err and moved["run_id"] != rescored["run_id"]
    after_data = moved["provenance"]["task_fingerprints"]
    assert after_data["mmlu_anatomy"]["data"] != after["mmlu_anatomy"]["data"]
    assert after_data["tiny_medical"] == after["tiny_medical"]

    err, forced = run_once([*run, "--force"], results, env, monkeypatch)
    assert "trained artifact found" in err and "training lora" not in err
    assert forced["run_id"] == moved["run_id"] and forced["finished_at"] >= moved["finished_at"]
    err, _ = run_once([*run, "--retrain"], results, env, monkeypatch)
    assert "training lora" in err


def test_the_base_model_content_is_in_both_ids(tmp_path: Path) -> None:
    """Two builds of one model that differ in one weight (as the tiny base built with another
    thread count does) share no run and no training."""
    copy = tmp_path / "stories"
    shutil.copytree(STORIES, copy)
    first = resolve_spec("lora", "medical", model=str(copy))
    weights = next(p for p in copy.iterdir() if p.suffix in (".safetensors", ".bin"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    second = resolve_spec("lora", "medical", model=str(copy))
    assert first.inputs.model != second.inputs.model
    assert first.train_id != second.train_id and first.run_id != second.run_id


def test_columns_sharing_a_corpus_share_the_training_but_not_the_task_fingerprints() -> None:
    medical, law = (resolve_spec("lora", task, model=str(STORIES)) for task in ("medical", "law"))
    assert medical.train_id == law.train_id
    assert set(medical.inputs.tasks) == {"tiny_medical"} and set(law.inputs.tasks) == {"tiny_legal"}


@pytest.mark.skipif(not (SHARED / "data" / "mmlu").is_dir(), reason="needs ../shared/data")
def test_offline_tasks_fingerprint_the_data_folder_they_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """mmlu_anatomy reads data/mmlu/; a group in a folder of groups over other folders' tasks
    (mmlu_protocols) is fingerprinted over all the data."""
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(SHARED / "data"))
    tasks = provenance.task_fingerprints(("mmlu_anatomy", "mmlu_lm_eval_5shot"))
    assert tasks["mmlu_anatomy"]["data"] == provenance.fingerprint_path(SHARED / "data" / "mmlu")
    assert tasks["mmlu_lm_eval_5shot"]["data"] == provenance.fingerprint_path(SHARED / "data")
