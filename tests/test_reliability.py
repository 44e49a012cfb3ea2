"""Crashes and concurrency with real processes and real signals: SIGKILL mid-training, then resume;
two runs of the same spec at once. No mocks: each case runs `hydrabench` as a process."""

import json
from pathlib import Path

import pytest
from conftest import SHARED, artifact_info, error_lines, finish, kill_when, start

# Enough steps that a kill lands mid-training, checkpoints every 5 steps, a cheap evaluation.
RUN = ["run", "--method", "lora", "--task", "medical", "--max-steps", "60",
       "--checkpoint-every", "5", "--limit", "2"]
STORIES = str(SHARED / "models" / "stories260K")


@pytest.mark.slow
def test_sigkill_mid_training_leaves_no_record_and_resume_matches(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    finish(start(RUN, reference))

    killed = tmp_path / "killed"
    kill_when(start(RUN, killed), killed, "artifacts/.checkpoints-*/ckpt.pt")
    assert not list(killed.glob("runs/*/record.json"))
    assert not list(killed.glob("artifacts/*/artifact.json"))

    err = finish(start(RUN, killed))  # the rerun resumes from the checkpoint
    resumed, expected = artifact_info(killed)["train"], artifact_info(reference)["train"]
    assert resumed["resumed_from_step"] > 0, err
    assert resumed["final_loss"] == expected["final_loss"]  # exact, not approximate
    assert resumed["trained_tokens"] == expected["trained_tokens"]
    covers = artifact_info(killed)["metering"]["train"]["covers"]  # says what it metered
    assert covers == {"steps": 60 - resumed["resumed_from_step"], "of_steps": 60,
                      "complete": False}
    assert artifact_info(reference)["metering"]["train"]["covers"]["complete"]
    assert not list(killed.glob("artifacts/.staging-*")) and not list(killed.glob("runs/.st*"))


@pytest.mark.slow
def test_same_run_twice_at_once_runs_once(tmp_path: Path) -> None:
    results = tmp_path / "results"
    first, second = start(RUN, results), start(RUN, results)
    logs = finish(first) + finish(second)
    assert len(list(results.glob("runs/*/record.json"))) == 1
    assert logs.count("training lora") == 1  # the second waited on the lock, then reused it


@pytest.mark.slow
def test_different_runs_at_once_both_finish(tmp_path: Path) -> None:
    results = tmp_path / "results"
    procs = [start([*RUN, "--seed", str(seed)], results) for seed in (1, 2)]
    for proc in procs:
        finish(proc)
    records = [json.loads(p.read_text()) for p in results.glob("runs/*/record.json")]
    assert sorted(r["seed"] for r in records) == [1, 2]


@pytest.mark.slow
def test_sigkill_during_evaluation_leaves_no_record_and_rerun_finishes(tmp_path: Path) -> None:
    results = tmp_path / "results"
    kill_when(start(RUN, results), results, "runs/.staging-*")  # evaluation started writing
    assert not list(results.glob("runs/*/record.json"))
    assert list(results.glob("artifacts/*/artifact.json"))  # training had finished: kept
    err = finish(start(RUN, results))
    assert "training lora" not in err  # the finished artifact was reused
    assert len(list(results.glob("runs/*/record.json"))) == 1
    assert not list(results.glob("runs/.staging-*"))  # the killed run's scratch was cleared


def test_report_files_are_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    """A crash while writing a report (here: the rename fails) leaves the old file intact."""
    from hydrabench import atomic
    target = tmp_path / "table1.md"
    target.write_text("previous report")

    def crash(src: str, dst: str) -> None:
        raise OSError("killed")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError):
        atomic.write_text_atomic(target, "new report")
    assert target.read_text() == "previous report"
    assert [p.name for p in tmp_path.iterdir()] == ["table1.md"]  # no temp file left behind


def whole_runs(results: Path) -> list[Path]:
    """Run directories with a readable record and lm-eval's results beside it."""
    whole = []
    for directory in results.glob("runs/*"):
        try:
            json.loads((directory / "record.json").read_text())
        except (OSError, ValueError):
            continue
        if (directory / "lm_eval" / "lm_eval_results.json").is_file():
            whole.append(directory)
    return whole


@pytest.mark.slow
def test_force_killed_at_each_step_of_the_replacement_keeps_a_whole_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hydrabench.records.store import RunStore

    results = tmp_path / "results"
    run = [*RUN[:5], "--model", STORIES, "--max-steps", "2", "--limit", "2"]
    finish(start(run, results))
    (run_dir,) = results.glob("runs/[!.]*")
    for step in ("staged", "complete", "aside", "placed"):
        old = json.loads((run_dir / "record.json").read_text())
        monkeypatch.setenv("HYDRABENCH_KILL_AT", step)  # SIGKILL at that step of the swap
        killed = start([*run, "--force"], results)
        killed.communicate(timeout=600)
        monkeypatch.delenv("HYDRABENCH_KILL_AT")
        assert killed.returncode == -9, step
        assert whole_runs(results), step  # in place, or beside it ready to be put back
        assert not run_dir.exists() or run_dir in whole_runs(results), step  # never half

        RunStore(results)  # start-up: a whole copy goes back in place, the other one goes
        assert run_dir in whole_runs(results), step
        assert not list(results.glob("runs/.complete-*")) + list(results.glob("runs/.old-*"))
        new = json.loads((run_dir / "record.json").read_text())
        assert (new == old) == (step in ("staged", "complete")), step  # new once set aside
    assert "finished record found, skipping" in finish(start(run, results))
    # A scratch directory left by the kill at "staged" goes with the next run of the same id.
    finish(start([*run, "--force"], results))
    assert [p.name for p in (results / "runs").iterdir()] == [run_dir.name]


CORRUPTIONS = {"truncated": lambda text: text[: len(text) // 2].encode(), "empty": lambda _: b"",
               "binary": lambda _: b"\x00\xff\xfe\x80 binary",
               "wrong types": lambda text: json.dumps({**json.loads(text), "seed": "0"}).encode()}


def read_errors(capsys: pytest.CaptureFixture) -> tuple[list[str], str]:
    err = capsys.readouterr().err
    return error_lines(err), err


@pytest.mark.slow
def test_corrupt_records_are_named_in_one_line_rerun_by_run_and_never_done(
        store_env: Path, capsys: pytest.CaptureFixture) -> None:
    """A real finished run, its record.json then broken in each way; the CLI in-process."""
    from hydrabench.cli import main
    from hydrabench.config.tables import load_table
    from hydrabench.pipeline.resolve import table_runs
    from hydrabench.records.store import RunStore

    run = [*RUN[:5], "--model", STORIES, "--max-steps", "2", "--limit", "2"]
    assert main(run) == 0
    (path,) = (store_env / "results").glob("runs/*/record.json")
    good = path.read_text()
    # A table's cell with a corrupt record: not done for the sweep, skipped by the report.
    cell = next(spec for row, _, spec in table_runs(load_table("table1"), "tiny")
                if row.method == "lora")
    planted = RunStore().record_path(cell.run_id)
    planted.parent.mkdir(parents=True)
    capsys.readouterr()
    for kind, corrupt in CORRUPTIONS.items():
        path.write_bytes(corrupt(good))
        planted.write_bytes(corrupt(good))
        for argv in (["eval", "--run", path.parent.name, "--task", "law"],
                     ["export", path.parent.name]):
            assert main(argv) == 2, (kind, argv)
            errors, err = read_errors(capsys)
            assert len(errors) == 1 and str(path) in errors[0], (kind, argv, err)
            assert err.strip() == errors[0], (kind, argv, err)  # that line alone
        assert main(["report", "table1"]) == 0, kind
        errors, err = read_errors(capsys)
        assert not errors and [line for line in err.splitlines() if str(planted) in line], kind
        reports = store_env / "reports"  # each report file says what it skipped
        assert str(planted) in (reports / "table1.md").read_text(), kind
        assert "corrupt record(s) skipped" in (reports / "table1.tex").read_text(), kind
        assert "skipped_corrupt_records" in (reports / "table1.csv").read_text().splitlines()[0]
        assert main(["sweep", "table1", "--status"]) == 0
        (line,) = [line for line in capsys.readouterr().out.splitlines() if cell.run_id in line]
        assert " failed " in line and " done " not in line, (kind, line)
    old_format = json.loads(good)
    del old_format["spec"]["inputs"]  # a record from before run ids held content fingerprints
    path.write_text(json.dumps(old_format))
    assert main(["eval", "--run", path.parent.name, "--task", "law"]) == 2
    errors, _ = read_errors(capsys)
    assert len(errors) == 1 and "predates the content fingerprints" in errors[0], errors
    path.write_bytes(CORRUPTIONS["truncated"](good))
    assert main(run) == 0  # the corrupt record is run again
    errors, err = read_errors(capsys)
    assert [line for line in err.splitlines() if "corrupt record" in line and str(path) in line]
    assert json.loads(path.read_text())["metrics"]


@pytest.mark.slow
def test_records_and_artifacts_are_readable_as_the_umask_allows(store_env: Path) -> None:
    """0644 files and 0755 directories under umask 022, as reports are (not mkstemp's 0600)."""
    import os

    from hydrabench.cli import main

    umask = os.umask(0o022)
    try:
        assert main([*RUN[:5], "--model", STORIES, "--max-steps", "2", "--limit", "2"]) == 0
    finally:
        os.umask(umask)
    results = store_env / "results"
    (record,) = results.glob("runs/*/record.json")
    (artifact,) = results.glob("artifacts/*/artifact.json")
    for path in (record, artifact):
        assert path.stat().st_mode & 0o777 == 0o644, path
        assert path.parent.stat().st_mode & 0o777 == 0o755, path.parent


@pytest.mark.slow
def test_a_record_carries_its_profile_and_remote_code_needs_the_flag_each_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from hydrabench.cli import main
    from hydrabench.config import profiles

    results, made, elsewhere = tmp_path / "results", tmp_path / "made", tmp_path / "elsewhere"
    made.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(results))
    (made / "base2.yaml").write_text("extends: tiny\ntrain: {lr: 1.0e-3}\n")
    monkeypatch.chdir(made)
    assert main(["run", "--profile", "base2.yaml", "--method", "lora", "--task", "medical",
                 "--model", STORIES, "--max-steps", "2", "--limit", "2"]) == 0
    (path,) = results.glob("runs/*/record.json")
    record, run_id = json.loads(path.read_text()), path.parent.name
    assert record["profile"]["train"]["lr"] == 1e-3 and "extends" not in record["profile"]

    monkeypatch.chdir(elsewhere)  # base2.yaml is not here; a new process has not parsed it
    profiles._load_profile.cache_clear()
    assert main(["eval", "--run", run_id, "--task", "law", "--limit", "2"]) == 0
    assert main(["export", run_id]) == 0

    record["spec"]["trust_remote_code"] = True  # planted: it must not run the model's code
    path.write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["eval", "--run", run_id, "--task", "law", "--limit", "2"]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "--trust-remote-code" in errors[0], errors
    # With the flag the planted record is still refused: its spec no longer gives its train id.
    assert main(["eval", "--run", run_id, "--task", "law", "--limit", "2",
                 "--trust-remote-code"]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "is not its spec's" in errors[0], errors


@pytest.mark.slow
def test_version_list_runs_and_show_a_run(store_env: Path, capsys: pytest.CaptureFixture) -> None:
    from hydrabench.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("hydrabench ")
    assert main([*RUN[:5], "--model", STORIES, "--max-steps", "2", "--limit", "2"]) == 0
    (path,) = (store_env / "results").glob("runs/*/record.json")
    run_id = path.parent.name
    assert " ± " in capsys.readouterr().out  # value ± stderr (n)
    assert main(["eval", "--run", run_id, "--task", "law", "--limit", "2", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert set(scored["tasks"]["tiny_legal"]) >= {"value", "stderr", "n"}
    assert Path(scored["record"]).is_file() and scored["run_id"] in scored["record"]
    assert main(["list", "runs"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(run_id))
    assert " lora " in line and " medical " in line
    assert main(["show", run_id]) == 0
    shown = capsys.readouterr().out
    assert str(path) in shown and "tiny_medical" in shown and "(n=2)" in shown
    assert main(["show", run_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_id"] == run_id
    assert main(["show", "no-such-run"]) == 2
