"""Issue 32, items 3, 6 and 9 as a hostile tester found them: what a kill -9 leaves behind, a
full disk while replacing a finished run, an adapter config that does not match its tensors, and
two models of the same folder name under `protocols`."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import (
    SHARED,
    artifact_info,
    error_lines,
    finish,
    kill_when,
    mounted_tmpfs,
    start,
)

from hydrabench.atomic import write_text_atomic
from hydrabench.cli import main

RUN = ["run", "--method", "lora", "--task", "medical", "--max-steps", "20",
       "--checkpoint-every", "5", "--limit", "2"]
SHORT_RUN = [*RUN[:5], "--max-steps", "2", "--limit", "2"]
STORIES = SHARED / "models" / "stories260K"


def dead_pid() -> int:
    """The pid of a process of this host that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_an_atomic_write_removes_what_killed_writers_of_that_file_left(tmp_path: Path) -> None:
    """A report writer killed mid-write leaves `.table1.md.<pid>@<host>.<x>.tmp`; the next write
    of table1.md removes it, and keeps the temps of a live writer, of another host, and of
    another file."""
    host = socket.gethostname()
    dead = tmp_path / f".table1.md.{dead_pid()}@{host}.k1ll3d.tmp"
    live = tmp_path / f".table1.md.1@{host}.inflight.tmp"  # init: always alive
    elsewhere = tmp_path / f".table1.md.{dead_pid()}@another-{host}.remote.tmp"
    other_file = tmp_path / f".table2.md.{dead_pid()}@{host}.k1ll3d.tmp"
    for temp in (dead, live, elsewhere, other_file):
        temp.write_text("half a rep")
    write_text_atomic(tmp_path / "table1.md", "the report\n")
    assert (tmp_path / "table1.md").read_text() == "the report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["table1.md", live.name, elsewhere.name, other_file.name])


@pytest.mark.slow
def test_a_checkpoint_write_killed_midway_is_removed_and_the_rerun_resumes(
        tmp_path: Path) -> None:
    """Killed while writing its second checkpoint: the half-written temp beside the whole first
    one (as `atomic_path` names it, and as older versions named it) goes with the next run of the
    same id, which resumes from the whole checkpoint and removes the folder when it finishes."""
    results = tmp_path / "results"
    kill_when(start(RUN, results), results, "artifacts/.checkpoints-*/ckpt.pt")
    (folder,) = results.glob("artifacts/.checkpoints-*")
    whole = (folder / "ckpt.pt").read_bytes()
    half = whole[: len(whole) // 2]
    (folder / f".ckpt.pt.{dead_pid()}@{socket.gethostname()}.a1b2c3d4.tmp").write_bytes(half)
    (folder / ".ckpt.pt.x9y8z7w6.tmp").write_bytes(half)

    err = finish(start(RUN, results))
    resumed = artifact_info(results)["train"]["resumed_from_step"]
    assert resumed > 0 and resumed % 5 == 0, err
    assert not folder.exists()  # neither the checkpoint nor a temp of it is kept
    assert len(list(results.glob("runs/*/record.json"))) == 1


@pytest.fixture
def filled_disk(tmp_path: Path):
    """A real disk that fills up: a 4 MiB tmpfs (room for a finished run), and a function that
    fills it to the last byte."""
    with mounted_tmpfs(tmp_path / "disk", "4m") as disk:

        def fill() -> None:
            # Closing it fails too (the last flush): both inside the raises.
            with pytest.raises(OSError, match="No space left"), \
                    open(disk / "filler", "wb") as fh:
                while True:
                    fh.write(b"\0" * 4096)
                    fh.flush()

        yield disk, fill


@pytest.mark.slow
def test_a_full_disk_while_replacing_a_finished_run_is_one_line_and_keeps_it(
        filled_disk, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    disk, fill = filled_disk
    results = disk / "results"
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(results))
    assert main(SHORT_RUN) == 0
    (run_dir,) = results.glob("runs/[!.]*")
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    fill()

    assert main([*SHORT_RUN, "--force"]) == 2
    err = capsys.readouterr().err
    errors = error_lines(err)
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "lm_eval_results.json: No space left on device (needs " in errors[0], errors
    assert " free)" in errors[0] and str(results) in errors[0]
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # the finished run, whole
    assert [p.name for p in (results / "runs").iterdir()] == [run_dir.name]  # no scratch left


@pytest.mark.slow
def test_an_adapter_config_that_misses_its_tensors_refuses_to_export(
        store_env: Path, capsys: pytest.CaptureFixture) -> None:
    """The tester's plant: a finished LoRA run whose adapter_config.json says
    `target_modules: [lm_head]` over its q/v tensors exported an un-adapted model, exit 0."""
    assert main([*SHORT_RUN, "--model", str(STORIES)]) == 0
    (run_dir,) = (store_env / "results" / "runs").glob("[!.]*")
    (config_path,) = (store_env / "results" / "artifacts").glob("*/adapter_config.json")
    config = json.loads(config_path.read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    config_path.write_text(json.dumps({**config, "target_modules": ["lm_head"]}))
    capsys.readouterr()

    assert main(["export", run_dir.name]) == 2
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert "does not match its config" in line and "q_proj.lora_A" in line, err
    assert "Traceback" not in err
    assert not list((store_env / "results").glob("exports/*"))  # nothing written

    config_path.write_text(json.dumps(config))  # put back: the whole artifact still exports
    assert main(["export", run_dir.name]) == 0


@pytest.mark.slow
def test_two_models_of_one_folder_name_keep_their_own_protocol_outputs(
        store_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """`protocols --model /a/stories260K`, then `/b/stories260K` (another model under the same
    folder name): the second neither overwrites the first's report nor its per-sample outputs;
    the first keeps its readable name, and scoring it again goes to that name."""
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(SHARED / "data"))
    a, b = tmp_path / "a" / "stories260K", tmp_path / "b" / "stories260K"
    shutil.copytree(STORIES, a)
    shutil.copytree(STORIES, b)
    config = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))  # another model
    argv = ["protocols", "--limit", "1", "--protocols", "lm-eval-0shot", "--model"]

    reports = {}
    for model in (a, b, a):
        assert main([*argv, str(model)]) == 0
        reports.setdefault(model, []).append(Path(capsys.readouterr().out.split()[1]))
    assert reports[a][0] == reports[a][1]
    assert reports[a][0].name == "protocols-mmlu-stories260K-limit1.csv"
    assert reports[b][0] != reports[a][0] and reports[b][0].name.startswith(
        "protocols-mmlu-stories260K-")
    for model, (csv, *_) in reports.items():
        assert str(model) in set(pd.read_csv(csv)["model"])  # each report still its own model's
        outputs = store_env / "results" / "protocols" / csv.stem
        assert json.loads((outputs / "scored_model.json").read_text())["model"] == str(model)
        assert list((outputs / "lm-eval-0shot").glob("samples_*.jsonl"))
