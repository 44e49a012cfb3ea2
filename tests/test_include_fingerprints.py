"""An included task's run id (issue 32, items 8 and 3): what its YAML `include:`s from outside
its folder and every file its `data_files` globs match are in it, a task whose files all stay in
its folder keeps its id; an included task may not take a name of lm-eval's own; a folder named
x.yaml is a folder, as lm-eval takes it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SHARED, assert_refused_in_one_line

from hydrabench.config import includes
from hydrabench.evaluation import harness
from hydrabench.pipeline.resolve import resolve_spec
from hydrabench.records.provenance import task_fingerprints

STORIES = SHARED / "models" / "stories260K"

# An lm-eval multiple-choice task over a JSONL (the README's capitals task, renamed).
TASK = """\
task: mine
dataset_path: json
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
"""


@pytest.fixture(autouse=True)
def no_folders() -> Iterator[None]:
    """Each test names its own folders; the next test starts from none, as main does."""
    includes.use_only([], "--include-path")
    yield
    includes.use_only([], "--include-path")


def write_rows(path: Path, *answers: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question": f"Q{i}?", "choices": ["a", "b", "c"],
                                        "answer": answer}) + "\n"
                            for i, answer in enumerate(answers)))
    return path


def run_id(folder: Path) -> str:
    """The run id of scoring stories260K on the folder's task `mine`, as a fresh command line
    naming --include-path FOLDER resolves it."""
    includes.use_only([folder], "--include-path")
    return resolve_spec("base", "lm-eval:mine", model=str(STORIES), lm_eval_task_ok=True).run_id


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize("form", ["relative", "absolute list"])
def test_what_an_included_task_includes_from_outside_its_folder_is_in_its_run_id(
        tmp_path: Path, form: str) -> None:
    common, mine = tmp_path / "common", tmp_path / "mine"
    common.mkdir()
    mine.mkdir()
    # base.yaml (outside the folder) includes deeper.yaml and names a function of helpers.py.
    (common / "base.yaml").write_text(TASK.replace("task: mine\n", "include: deeper.yaml\n")
                                      + "process_docs: !function helpers.process_docs\n")
    (common / "deeper.yaml").write_text("metric_list:\n  - {metric: acc, aggregation: mean}\n")
    (common / "helpers.py").write_text("def process_docs(docs):\n    return docs\n")
    (common / "first.yaml").write_text("description: 'Answer the question.'\n")
    target = ("../common/base.yaml" if form == "relative"
              else f"[{common / 'first.yaml'}, {common / 'base.yaml'}]")
    (mine / "mine.yaml").write_text(f"include: {target}\ntask: mine\n"
                                    f"dataset_kwargs: {{data_files: {{test: {mine}/t.jsonl}}}}\n")
    write_rows(mine / "t.jsonl", 0, 1)
    before = run_id(mine)
    for file, old, new in ((common / "base.yaml", "Answer:", "A:"),
                           (common / "deeper.yaml", "mean", "median"),
                           (common / "helpers.py", "return docs", "return docs.select([0])"),
                           *[(common / "first.yaml", "the", "a")] * (form != "relative")):
        original = file.read_text()
        edit(file, old, new)
        assert run_id(mine) != before, f"editing {file.name} kept the run id"
        file.write_text(original)
        assert run_id(mine) == before  # content, not history


def test_an_included_task_whose_files_stay_in_its_folder_keeps_its_run_id(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fingerprints from before includes and globs were followed (values from that code): a
    task including a YAML of its own family and naming its data by path keeps its id."""
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine"
    (mine / "fam").mkdir(parents=True)
    (mine / "fam" / "common.yaml").write_text(TASK.replace("task: mine\n", ""))
    (mine / "fam" / "mine.yaml").write_text(
        "include: common.yaml\ntask: mine\n"
        "dataset_kwargs: {data_files: {test: data/test.jsonl, train: [data/train.jsonl]}}\n")
    write_rows(tmp_path / "data" / "test.jsonl", 0, 2)
    write_rows(tmp_path / "data" / "train.jsonl", 1)
    includes.use_only([mine], "--include-path")
    assert task_fingerprints(("mine",))["mine"] == {
        "config": "0df626c4ac2e8b34ab8258bd84d7b11a16be9ef75aae7d15663157e93b9efed9",
        "data": "7c1230814225602b45cea165c661d027467f382f63ceafdb68839b89195fb1f0",
        "include_path": str(mine)}


@pytest.mark.parametrize("kwargs", [
    "{data_files: ../data/*.jsonl}",
    "{data_files: [../data/a.jsonl, '../data/b*.jsonl']}",
    "{data_files: {test: ['../data/*.jsonl']}}",
    "{data_files: [{split: test, path: '../data/**/*.jsonl'}]}",
    "{data_dir: ../data, data_files: {test: '*.jsonl'}}",
], ids=["glob", "list", "splits", "split list", "data_dir"])
def test_every_file_a_data_files_glob_matches_is_in_the_run_id(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: str) -> None:
    """The data outside the task's folder, the patterns relative to where hydrabench runs, as
    `datasets` reads them."""
    mine, data = tmp_path / "mine", tmp_path / "data"
    mine.mkdir()
    (mine / "mine.yaml").write_text(f"{TASK}dataset_kwargs: {kwargs}\n")
    monkeypatch.chdir(mine)
    write_rows(data / "a.jsonl", 0, 1)
    b1 = write_rows(data / "b1.jsonl", 2, 0)
    before = run_id(mine)
    edit(b1, '"answer": 2', '"answer": 1')  # the same size
    edited = run_id(mine)
    assert edited != before
    write_rows(data / "b2.jsonl", 1)  # one more file the pattern matches
    added = run_id(mine)
    assert added != edited
    # What `datasets` does not read moves nothing: another extension, a hidden file.
    (data / "notes.txt").write_text("not data\n")
    write_rows(data / ".b3.jsonl", 0)
    assert run_id(mine) == added


def test_a_folder_named_like_a_yaml_file_is_a_folder(tmp_path: Path) -> None:
    """lm-eval's index skips what is no file and indexes the YAML inside: so does hydrabench
    (it used to stop on IsADirectoryError, a 26-line traceback)."""
    from lm_eval.tasks._index import TaskIndex

    mine = tmp_path / "mine"
    (mine / "x.yaml").mkdir(parents=True)
    (mine / "x.yaml" / "inner.yaml").write_text(TASK.replace("task: mine", "task: inner"))
    (mine / "mine.yaml").write_text(TASK)
    includes.use_only([mine], "--include-path")
    assert sorted(includes.folder_of("inner").tasks) == sorted(TaskIndex.build([mine])) == [
        "inner", "mine"]
    assert includes.folder_of("inner").tasks["inner"] == mine / "x.yaml" / "inner.yaml"
    assert harness.unreadable_task_file("nothing_like_it") is None  # a mistyped task's check


@pytest.mark.slow  # indexes all of lm-eval's own tasks (20 s on two cores)
def test_an_included_task_may_not_take_a_name_of_lm_evals_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Online, lm-eval indexes its own tasks first and an included folder's `task: arc_easy`
    would replace its arc_easy without a word; offline its own are not indexed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # hydrabench's switch; the hub libraries stay off
    monkeypatch.delenv("HYDRABENCH_DATA_DIR", raising=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "arc.yaml").write_text(TASK.replace("task: mine", "task: arc_easy")
                                   + f"dataset_kwargs: {{data_files: {mine}/t.jsonl}}\n")
    write_rows(mine / "t.jsonl", 0, 1)
    results = tmp_path / "results"
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(results))
    assert_refused_in_one_line(
        ["eval", "--model", str(STORIES), "--task", "arc_easy", "--include-path", str(mine),
         "--limit", "2"],
        f"{mine / 'arc.yaml'}: arc_easy is already defined by ", results, capsys)
