"""Shared results folders read as a hostile colleague plants them (issue 32): a record is data.

Each case starts from a valid record (hand-built as the runner writes one: nothing trains) and
changes one field, or plants one file beside it. Reading it must run no code (a marker file the
planted code would write stays absent), follow no path out of results/, and write nothing there:
exit 2 and one error line, or for `sweep --status` one line and the run shown as failed.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED, error_lines

from hydrabench.atomic import write_json_atomic
from hydrabench.cli import main
from hydrabench.config import profiles
from hydrabench.config.profiles import load_profile
from hydrabench.config.spec import RunSpec
from hydrabench.pipeline.resolve import resolve_spec
from hydrabench.records.store import RunStore

STORIES = SHARED / "models" / "stories260K"
pytestmark = pytest.mark.skipif(not (STORIES.is_dir() and (SHARED / "data").is_dir()),
                                reason="needs ../shared/models and ../shared/data")


@pytest.fixture(scope="module")
def spec() -> RunSpec:
    """A LoRA run on stories260K, tiny profile (resolving it reads the model's files once)."""
    return resolve_spec("lora", "medical", model=str(STORIES))


def valid_record(spec: RunSpec) -> dict[str, Any]:
    """A whole record as the runner writes it (artifact relative to the results root)."""
    metrics = {task: {"metrics": {"acc,none": 0.5}, "stderr": {"acc,none": 0.1},
                      "primary": "acc,none", "value": 0.5, "n": 4} for task in spec.eval_tasks}
    return {"run_id": spec.run_id, "method": spec.method, "task": spec.task, "seed": spec.seed,
            "spec": spec.to_dict(), "profile": load_profile(spec.profile).to_dict(),
            "metrics": metrics, "column_tasks": list(spec.eval_tasks),
            "training": {"trained": True, "train_id": spec.train_id},
            "artifact": f"artifacts/{spec.train_id}", "train_id": spec.train_id, "backend": "hf"}


def plant(results: Path, record: dict[str, Any]) -> Path:
    """`record` at its run id under results/, beside its own (empty) artifact folder."""
    store = RunStore(results)
    write_json_atomic(store.record_path(record["run_id"]), record)
    store.artifact_dir(record["train_id"]).mkdir(parents=True, exist_ok=True)
    return store.record_path(record["run_id"])


def tree(root: Path) -> dict[str, bytes | str]:
    """Every path under `root` with its bytes (a link: its target)."""
    return {str(p.relative_to(root)): (os.readlink(p) if p.is_symlink() else
                                       p.read_bytes() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def refused(argv: list[str], message: str, results: Path, capsys: pytest.CaptureFixture,
            marker: Path | None = None) -> None:
    """`hydrabench ARGV` in-process: exit 2, one error line saying `message`, no traceback,
    nothing written under results/, and the planted code's marker absent."""
    before = tree(results)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = error_lines(err)
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert "Traceback" not in err
    assert tree(results) == before
    assert marker is None or not marker.exists()


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("HYDRABENCH_REPORTS", str(tmp_path / "reports"))
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(SHARED / "data"))  # protocols' local MMLU
    return tmp_path / "results"


def model_with_code(where: Path, marker: Path) -> Path:
    """stories260K whose config maps AutoModelForCausalLM to its own evil.py (transformers
    imports it under trust_remote_code), which writes `marker` when imported."""
    model = where / "model-with-code"
    shutil.copytree(STORIES, model, ignore=shutil.ignore_patterns("original_llama2c"))
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\n\n\n"
        "class EvilModel(LlamaForCausalLM):\n    pass\n")
    return model


@pytest.mark.parametrize("command", [["export"], ["protocols", "--limit", "1", "--run"]])
def test_remote_code_a_record_asks_for_needs_the_flag_on_this_command_line(
        spec: RunSpec, results: Path, tmp_path: Path, command: list[str],
        capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "marker"
    record = valid_record(spec)
    record["spec"]["model"] = str(model_with_code(tmp_path, marker))
    record["spec"]["trust_remote_code"] = True  # planted
    plant(results, record)
    refused([*command, spec.run_id], "--trust-remote-code", results, capsys, marker)


def task_folder_with_code(where: Path, marker: Path) -> Path:
    """A task folder whose task's utils.py writes `marker` when lm-eval imports it."""
    folder = where / "hostile_tasks"
    folder.mkdir()
    (folder / "hostile.yaml").write_text(
        "task: hostile_task\ndataset_path: json\n"
        "dataset_kwargs: {data_files: {test: data.jsonl}}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: !function utils.doc_to_text\n"
        "doc_to_choice: [a, b]\ndoc_to_target: 0\n")
    (folder / "data.jsonl").write_text('{"q": "?"}\n')
    (folder / "utils.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n\n\n"
        "def doc_to_text(doc):\n    return doc['q']\n")
    return folder


def test_eval_run_refuses_the_task_folder_a_record_s_profile_names(
        spec: RunSpec, results: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The record's profile file is not here (made elsewhere): its embedded profile stands in,
    as data. Its include_path is not used: the command line must name the folder again."""
    marker = tmp_path / "marker"
    made = tmp_path / "made.yaml"
    made.write_text("extends: tiny\n")
    mine = resolve_spec("lora", "medical", str(made), model=str(STORIES))
    made.unlink()
    record = valid_record(mine)
    folder = task_folder_with_code(tmp_path, marker)
    record["profile"]["include_path"] = [str(folder)]  # planted
    plant(results, record)
    refused(["eval", "--run", mine.run_id, "--task", "hostile_task", "--limit", "1"],
            f"was made with --include-path {folder}; pass it again", results, capsys, marker)


def test_eval_run_refuses_the_task_folders_of_a_profile_file_the_record_names(
        spec: RunSpec, results: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A profile file the record names (not this command line) may not add task folders: the
    folder is refused before it is read (its broken YAML would be another error)."""
    marker = tmp_path / "marker"
    made = tmp_path / "made.yaml"
    made.write_text("extends: tiny\n")
    mine = resolve_spec("lora", "medical", str(made), model=str(STORIES))
    plant(results, valid_record(mine))
    folder = task_folder_with_code(tmp_path, marker)
    (folder / "broken.yaml").write_text("task: [unclosed\n")
    made.write_text(f"extends: tiny\ninclude_path: [{folder}]\n")  # planted
    profiles._load_profile.cache_clear()  # as a new process reads it
    refused(["eval", "--run", mine.run_id, "--task", "hostile_task", "--limit", "1"],
            "was made with --include-path", results, capsys, marker)


# The commands that read a record's artifact, or the record itself (the second run of compare
# is a valid one).
READERS = {"export": ["export", "{run}"], "eval": ["eval", "--run", "{run}", "--task", "medical",
                                                   "--limit", "1"],
           "protocols": ["protocols", "--limit", "1", "--run", "{run}"],
           "show": ["show", "{run}"], "compare": ["compare", "{run}", "{other}"],
           "report": ["report", "table1"]}


def other_run(spec: RunSpec, results: Path) -> RunSpec:
    """A second valid run (seed 1) with its own adapter folder: what a planted field names."""
    other = resolve_spec("lora", "medical", seed=1, model=str(STORIES))
    plant(results, valid_record(other))
    return other


def argv(command: str, run: str, other: str) -> list[str]:
    return [a.format(run=run, other=other) for a in READERS[command]]


@pytest.mark.parametrize("command", list(READERS))
def test_an_artifact_field_naming_another_run_s_adapter_is_refused(
        spec: RunSpec, results: Path, command: str, capsys: pytest.CaptureFixture) -> None:
    other = other_run(spec, results)
    record = valid_record(spec)
    record["artifact"] = f"artifacts/{other.train_id}"  # planted: the seed-1 LoRA
    plant(results, record)
    refused(argv(command, spec.run_id, other.run_id), "is not the run's own", results, capsys)


@pytest.mark.parametrize("named", ["absolute", "dotdot"])
@pytest.mark.parametrize("command", ["export", "show"])
def test_an_artifact_field_leading_outside_results_is_refused(
        spec: RunSpec, results: Path, tmp_path: Path, named: str, command: str,
        capsys: pytest.CaptureFixture) -> None:
    elsewhere = tmp_path / "elsewhere" / spec.train_id
    elsewhere.mkdir(parents=True)
    record = valid_record(spec)
    record["artifact"] = (str(elsewhere) if named == "absolute"  # planted
                          else f"artifacts/../../elsewhere/{spec.train_id}")
    plant(results, record)
    refused(argv(command, spec.run_id, ""), "is not the run's own", results, capsys)


@pytest.mark.parametrize("command", list(READERS))
def test_a_symlink_out_of_results_is_refused(
        spec: RunSpec, results: Path, tmp_path: Path, command: str,
        capsys: pytest.CaptureFixture) -> None:
    """The record is valid; its artifact folder is a link to another user's adapter."""
    other = other_run(spec, results)
    plant(results, valid_record(spec))
    artifact = RunStore(results).artifact_dir(spec.train_id)
    artifact.rmdir()
    (tmp_path / "theirs").mkdir()
    artifact.symlink_to(tmp_path / "theirs")  # planted
    refused(argv(command, spec.run_id, other.run_id), "leads outside the results folder",
            results, capsys)


def test_a_symlink_out_of_a_run_folder_is_refused(
        spec: RunSpec, results: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """compare reads the per-sample outputs under runs/<id>/lm_eval: a link there is refused."""
    other = other_run(spec, results)
    record = plant(results, valid_record(spec))
    (tmp_path / "theirs").mkdir()
    (record.parent / "lm_eval").symlink_to(tmp_path / "theirs")  # planted
    refused(["compare", spec.run_id, other.run_id], "leads outside the results folder",
            results, capsys)


@pytest.mark.parametrize("field", ["data_source", "provenance.data_source",
                                   "provenance.hardware.cpu_model", "provenance.hardware.gpus"])
def test_a_line_break_in_what_reports_print_makes_the_record_corrupt(
        spec: RunSpec, results: Path, field: str, capsys: pytest.CaptureFixture) -> None:
    """A report prints these fields into Markdown: a newline would start a heading or a row."""
    record = valid_record(spec)
    record["provenance"] = {"model_source": str(STORIES), "data_fingerprints": {},
                            "data_source": "local", "packages": {}, "python": "3.12",
                            "hardware": {"cpu_model": "EPYC", "gpus": [{"name": "H100"}]}}
    planted = "EPYC\n# not ours | x |"
    if field == "data_source":
        record["data_source"] = planted
    elif field == "provenance.hardware.gpus":
        record["provenance"]["hardware"]["gpus"] = [{"name": planted}]
    else:
        *parents, key = field.split(".")
        target = record
        for name in parents:
            target = target[name]
        target[key] = planted
    plant(results, record)
    refused(["show", spec.run_id], "holds a line break or control character", results, capsys)


def test_a_moved_results_folder_finds_its_own_artifact_not_the_original_s(
        spec: RunSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """Records written before paths were relative name the artifact by absolute path: after
    `mv results moved`, the run's own artifact under the new root is the one found."""
    old, moved = tmp_path / "results", tmp_path / "moved"
    record = valid_record(spec)
    record["artifact"] = str(old / "artifacts" / spec.train_id)  # as records were written
    plant(old, record)
    old.rename(moved)
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(moved))
    assert RunStore(moved).load(spec.run_id).artifact == moved / "artifacts" / spec.train_id
    assert main(["show", spec.run_id]) == 0
    out = capsys.readouterr().out
    assert f"artifact  {moved / 'artifacts' / spec.train_id}" in out and str(old) not in out
    assert RunStore(moved).load(spec.run_id).to_dict()["artifact"] == (
        f"artifacts/{spec.train_id}")


class _RunsCode:
    """What a planted pickle holds: unpickling it calls exec, which writes the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def sweep_status(results: Path, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture) -> tuple[str, str]:
    """`sweep table1 --status --rows 1` (no Slurm here: the queue is empty), its out and err."""
    from hydrabench.pipeline import sweep as sweeps
    monkeypatch.setattr(sweeps, "queued_jobs", dict)
    capsys.readouterr()
    assert main(["sweep", "table1", "--status", "--rows", "1"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.out, captured.err


def first_run_id() -> str:
    from hydrabench.config.tables import load_table
    from hydrabench.pipeline.run import execute
    from hydrabench.pipeline.sweep import plan_sweep

    return plan_sweep(load_table("table1"), "tiny", (0,), execute, rows=[1]).runs[0].spec.run_id


def test_sweep_status_never_runs_a_planted_pickle(
        results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    marker, folder = tmp_path / "marker", results / "slurm" / "s"
    run_id = first_run_id()
    folder.mkdir(parents=True)
    pointer = RunStore(results).runs / f"{run_id}.slurm.json"
    write_json_atomic(pointer, {"job_id": "9_0", "folder": str(folder), "log": "9.err"})
    from submitit.core.utils import JobPaths

    # planted: submitit's result file of the job, a pickle that runs code
    JobPaths(folder, job_id="9_0", task_id=0).result_pickle.write_bytes(
        pickle.dumps(("error", _RunsCode(marker))))
    before = tree(results)
    out, _ = sweep_status(results, monkeypatch, capsys)
    assert not marker.exists()
    (line,) = [line for line in out.splitlines() if run_id in line]
    assert " failed " in line and "is not submitit's: not read" in line
    assert tree(results) == before


def test_sweep_status_names_a_corrupt_pointer_in_one_line_and_shows_the_run_failed(
        results: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    run_id = first_run_id()
    pointer = RunStore(results).runs / f"{run_id}.slurm.json"
    pointer.parent.mkdir(parents=True)
    pointer.write_text('{"job_id": "9_0", "fol')  # planted: cut short
    before = tree(results)
    out, err = sweep_status(results, monkeypatch, capsys)
    assert err.count("\n") == 1 and f"corrupt Slurm pointer {pointer}" in err, err
    (line,) = [line for line in out.splitlines() if run_id in line]
    assert " failed " in line and "corrupt Slurm pointer" in line
    assert tree(results) == before


# -- a fresh hostile round: links inside results/, fifos, pointers that lead out --------------


@pytest.mark.parametrize("command", ["export", "eval", "show", "compare"])
def test_an_artifact_folder_linking_to_another_artifact_under_results_is_refused(
        spec: RunSpec, results: Path, command: str, capsys: pytest.CaptureFixture) -> None:
    """Inside the root, but not the run's own folder: another run's weights, silently."""
    other = other_run(spec, results)
    plant(results, valid_record(spec))
    store = RunStore(results)
    store.artifact_dir(spec.train_id).rmdir()
    store.artifact_dir(spec.train_id).symlink_to(store.artifact_dir(other.train_id))  # planted
    refused(argv(command, spec.run_id, other.run_id), "is a symlink: refused", results, capsys)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_file_in_the_artifact_linking_out_is_refused(
        spec: RunSpec, results: Path, tmp_path: Path, name: str,
        capsys: pytest.CaptureFixture) -> None:
    plant(results, valid_record(spec))
    (tmp_path / "theirs").write_bytes(b"{}")
    (RunStore(results).artifact_dir(spec.train_id) / name).symlink_to(tmp_path / "theirs")
    refused(["export", spec.run_id], "leads outside the results folder", results, capsys)


def test_a_fifo_as_a_record_or_samples_file_is_one_line_not_a_hang(
        spec: RunSpec, results: Path, capsys: pytest.CaptureFixture) -> None:
    other = other_run(spec, results)
    record = plant(results, valid_record(spec))
    (record.parent / "lm_eval").mkdir()
    os.mkfifo(record.parent / "lm_eval" / "samples_tiny_medical.jsonl")  # planted
    refused(["compare", spec.run_id, other.run_id], "is not a regular file", results, capsys)
    record.unlink()
    os.mkfifo(record)  # planted
    refused(["show", spec.run_id], "is not a regular file", results, capsys)


def test_a_lock_that_is_a_symlink_is_one_line(results: Path, tmp_path: Path) -> None:
    """A planted lock link (export's, a run's): one line naming it, nothing made at its end."""
    from hydrabench.records.store import OutsideResults

    locks = results / ".locks"
    locks.mkdir(parents=True)
    (locks / "export-x-None.lock").symlink_to(tmp_path / "victim")  # planted
    with pytest.raises(OutsideResults, match="is not a plain file \\(a symlink\\?\\)"), \
            RunStore(results).lock("export-x-None"):
        pass
    assert not (tmp_path / "victim").exists()


@pytest.mark.parametrize("pointer", [
    {"job_id": "9_0", "folder": "{outside}", "log": "9.err"},
    {"job_id": "9_0", "folder": "{inside}", "log": "\u001b]0;pwn\u0007\u001b[2J"},
    "fifo"])
def test_a_pointer_leading_out_or_unprintable_or_a_fifo_is_corrupt_and_read_no_further(
        results: Path, tmp_path: Path, pointer: dict | str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    run_id = first_run_id()
    path = RunStore(results).runs / f"{run_id}.slurm.json"
    path.parent.mkdir(parents=True)
    if pointer == "fifo":
        os.mkfifo(path)
    else:
        places = {"{outside}": str(tmp_path / "outside"), "{inside}": str(results / "slurm" / "s")}
        write_json_atomic(path, {k: places.get(v, v) for k, v in pointer.items()})
    out, err = sweep_status(results, monkeypatch, capsys)
    assert err.count("\n") == 1 and f"corrupt Slurm pointer {path}" in err, err
    assert "\u001b" not in out + err
    (line,) = [line for line in out.splitlines() if run_id in line]
    assert " failed " in line


@pytest.mark.parametrize("method", ["lora", "lora-split"])
def test_an_adapter_config_naming_a_base_elsewhere_is_never_opened(
        method: str, tmp_path: Path) -> None:
    """The artifact's adapter_config names a folder outside; peft opens that folder's
    config.json when the loaded model is saved again. Here it is a folder, so opening it fails."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hydrabench.methods.lora import load_peft
    from hydrabench.methods.lora_split import load_combined

    outside = tmp_path / "outside"
    (outside / "config.json").mkdir(parents=True)  # planted: reading it raises
    artifact = tmp_path / "artifact"
    adapter = artifact / "combined" if method == "lora-split" else artifact
    name = "combined" if method == "lora-split" else "default"
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(STORIES),
                             LoraConfig(r=2, target_modules=["q_proj"]), adapter_name=name)
    trained.save_pretrained(artifact)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(outside)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    base = AutoModelForCausalLM.from_pretrained(STORIES)
    loaded = (load_combined if method == "lora-split" else load_peft)(base, artifact)
    assert loaded.peft_config[name].base_model_name_or_path == str(STORIES)
    loaded.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved").is_dir()


@pytest.mark.parametrize("target", ["folder", "dangling"])
def test_a_link_planted_where_an_export_goes_is_replaced_and_its_target_untouched(
        tmp_path: Path, target: str) -> None:
    """exports/<run id> is a link (to someone's folder, or to nothing): the new export takes
    its place, the link's target keeps its files, and no copy is left aside."""
    store = RunStore(tmp_path / "results")
    theirs = tmp_path / "theirs"
    if target == "folder":
        theirs.mkdir()
        (theirs / "weights").write_text("theirs")
    final = store.export_dir("lora-abc", "exact")
    final.parent.mkdir(parents=True)
    final.symlink_to(theirs)  # planted
    with store.staging(final) as scratch:
        (scratch / "model.safetensors").write_text("ours")
    assert not final.is_symlink() and (final / "model.safetensors").read_text() == "ours"
    assert sorted(p.name for p in final.parent.iterdir()) == ["lora-abc"]
    assert target == "dangling" or (theirs / "weights").read_text() == "theirs"
