"""Sweeps of a table's run matrix: locally, and as a job array on a real single-node Slurm.

When `sinfo` does not already answer, .ci/slurm-up.sh installs and starts Slurm on this machine
(root, apt) and is stopped again afterwards; where it cannot start, the Slurm test is skipped
with the script's last error lines. Runs are cut down (--max-steps, --limit) to seconds each.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import child_env
from submitit.core.utils import JobPaths, cloudpickle_dump

from hydrabench.atomic import write_json_atomic
from hydrabench.config.spec import spec_from_dict
from hydrabench.config.tables import load_table
from hydrabench.pipeline import sweep as sweeps
from hydrabench.pipeline.run import execute
from hydrabench.pipeline.sweep import Sweep, plan_sweep, read_pointer, slurm_parameters
from hydrabench.records.store import RunStore

REPO = Path(__file__).resolve().parents[1]
QUICK = ("--max-steps", "5", "--limit", "4")
QUICK_OVERRIDES = {"train": {"max_steps": 5}, "eval": {"limit": 4}}
SLURM_DIR = Path("/tmp/hydrabench-slurm")  # where .ci/slurm-up.sh keeps its conf, state and logs


def hydrabench(*args: str, results: Path, env: dict[str, str] | None = None,
               ) -> subprocess.CompletedProcess:
    # CPU runs (tiny), also on a GPU box: Slurm's jobs inherit the hidden CUDA (sbatch exports
    # the submitting environment), so a 2-task job's group is gloo's.
    env = child_env(results, base=env)
    return subprocess.run([sys.executable, "-m", "hydrabench.cli", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def states(status_output: str) -> dict[str, str]:
    """run id → state, from the table `sweep --status` prints."""
    return {m["run_id"]: m["state"] for m in re.finditer(
        r"\s(?P<state>done|running|pending|failed|skipped)\s+(?:\S+\s+)?"
        r"(?P<run_id>[\w.-]+-s\d+-[0-9a-f]{16})", status_output)}


def quick_sweep(rows: list[int] | None = None) -> Sweep:
    return plan_sweep(load_table("table1"), "tiny", (0,), execute, overrides=QUICK_OVERRIDES,
                      rows=rows)


class StandInExecutor:
    """submitit's executor as submit_slurm uses it, without Slurm: its SlurmExecutor needs
    Slurm's `srun` just to be built, and the real submission path has its own test on a real
    cluster (test_slurm_sweep_...)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.parameters, self.specs, self.executes = folder, {}, [], []

    def update_parameters(self, **parameters: object) -> None:
        self.parameters.update(parameters)

    def map_array(self, fn, specs, roots, executes):
        self.specs += specs
        self.executes += executes
        return [SimpleNamespace(job_id=f"10_{i}", paths=SimpleNamespace(stderr=f"10_{i}.err"))
                for i in range(len(specs))]


def submit_to_stand_in(sweep: Sweep) -> StandInExecutor:
    made: list[StandInExecutor] = []
    sweep.submit_slurm(executor_class=lambda folder: made.append(StandInExecutor(folder))
                       or made[-1])
    (executor,) = made
    return executor


def test_a_profile_file_s_sweep_writes_its_jobs_in_one_folder_under_results_slurm(
        store_env: Path, tmp_path: Path) -> None:
    """The sweep's folder is named by the profile file's name, never its path (a path's
    slashes nested it, and `..` led it out of results/slurm)."""
    profile = tmp_path / "deep" / "my profile.yaml"
    profile.parent.mkdir()
    profile.write_text("extends: tiny\n")
    sweep = plan_sweep(load_table("table1"), str(profile), (0,), execute,
                       overrides=QUICK_OVERRIDES, rows=[1])
    folder = submit_to_stand_in(sweep).folder
    assert folder.parent == (store_env / "results" / "slurm").resolve()
    assert folder.name.startswith("table1-my-profile.yaml-"), folder.name


def _sinfo_answers(env: dict[str, str]) -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], env=env, capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """An environment in which Slurm's commands (and so submitit) reach a working cluster."""
    if _sinfo_answers(dict(os.environ)):
        yield dict(os.environ)
        return
    env = {**os.environ, "HYDRABENCH_SLURM_DIR": str(SLURM_DIR),
           "SLURM_CONF": str(SLURM_DIR / "slurm.conf")}
    script = str(REPO / ".ci" / "slurm-up.sh")
    up = subprocess.run([script], env=env, capture_output=True, text=True, timeout=900)
    if up.returncode != 0:
        tail = " | ".join((up.stderr or up.stdout).strip().splitlines()[-5:])
        pytest.skip(f"Slurm could not start here (.ci/slurm-up.sh exited {up.returncode}): "
                    f"{tail}")
    yield env
    subprocess.run([script, "down"], env=env, capture_output=True, timeout=60)


def test_job_specs_survive_the_round_trip_through_a_dict() -> None:
    # Jobs get plain dicts; the spec rebuilt from one must name the same run.
    for run in quick_sweep().runs:
        assert spec_from_dict(run.spec.to_dict()).run_id == run.spec.run_id
        assert run.spec.train.max_steps == 5 and run.spec.eval.limit == 4


def test_slurm_resources_come_from_the_profile() -> None:
    # No --gpus-per-node at all on tiny: 0 is an error on clusters without GPU gres.
    assert slurm_parameters("tiny") == {"cpus_per_task": 1, "mem": "4G", "time": 20,
                                        "ntasks_per_node": 1}
    assert slurm_parameters("paper") == {"cpus_per_task": 8, "mem": "64G", "time": 720,
                                         "ntasks_per_node": 1, "gpus_per_node": 1}
    assert slurm_parameters("small")["time"] == 180  # its own time limit; the rest from paper


def test_status_tells_queued_running_and_failed_jobs_apart(
        store_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = quick_sweep(rows=[1, 2, 3, 4, 5, 7])
    done, running, queued, crashed, killed, unsubmitted = sweep.runs
    folder = store_env / "results" / "slurm" / "s"  # where the sweep's jobs write
    folder.mkdir(parents=True)
    for job, run in enumerate([done, running, queued, crashed, killed]):
        write_json_atomic(sweeps.pointer_path(sweep.store, run.spec.run_id),
                          {"job_id": f"9_{job}", "folder": str(folder), "log": "9.err"})
    # The smallest whole record (an empty one would count as corrupt, hence failed).
    write_json_atomic(sweep.store.record_path(done.spec.run_id), {
        "run_id": done.spec.run_id, "method": done.spec.method, "task": done.spec.task,
        "seed": done.spec.seed, "metrics": {}, "column_tasks": [], "training": {}})
    cloudpickle_dump(("error", "Traceback (most recent call last):\nValueError: boom\n"),
                     JobPaths(folder, job_id="9_3", task_id=0).result_pickle)
    monkeypatch.setattr(sweeps, "queued_jobs",
                        lambda: {"9_1": "RUNNING", "9_2": "PENDING (Resources)"})

    got = {s.run.row_number: (s.state, s.job, s.detail) for s in sweep.status()}
    assert got[1] == ("done", "9_0", "")
    assert got[2] == ("running", "9_1", "RUNNING")
    assert got[3] == ("pending", "9_2", "PENDING (Resources)")
    assert got[4] == ("failed", "9_3", "ValueError: boom")
    assert got[5][:2] == ("failed", "9_4") and "see 9.err" in got[5][2]
    assert got[7] == ("pending", None, "not submitted")
    # The failed and the never submitted runs are submitted again; nothing is queued twice.
    executor = submit_to_stand_in(sweep)
    assert executor.parameters["ntasks_per_node"] == 1 and set(executor.executes) == {execute}
    assert [spec_from_dict(spec).run_id for spec in executor.specs] == [
        r.spec.run_id for r in (crashed, killed, unsubmitted)]
    assert read_pointer(sweep.store, unsubmitted.spec.run_id)["job_id"] == "10_2"
    assert read_pointer(sweep.store, queued.spec.run_id)["job_id"] == "9_2"


@pytest.mark.slow
def test_local_sweep_runs_the_selected_rows_and_resumes(tmp_path: Path) -> None:
    results = tmp_path / "results"
    args = ("sweep", "table1", "--executor", "local", "--rows", "1,7", *QUICK)
    first = hydrabench(*args, results=results)
    assert first.returncode == 0, first.stderr[-3000:]
    store = RunStore(results)
    runs = quick_sweep(rows=[1, 7]).runs
    assert [r.row.method for r in runs] == ["lora", "hydralora"]
    assert all(store.has(r.spec.run_id) for r in runs)

    status = hydrabench(*args, "--status", results=results)
    assert states(status.stdout) == {r.spec.run_id: "done" for r in runs}, status.stdout
    rerun = hydrabench(*args, results=results)
    assert rerun.returncode == 0
    assert rerun.stderr.count("finished record found, skipping") == 2


@pytest.mark.slow
def test_slurm_sweep_runs_every_cell_once(slurm_env: dict[str, str], tmp_path: Path) -> None:
    results = tmp_path / "results"
    args = ("sweep", "table1", "--executor", "slurm", *QUICK)
    first = hydrabench(*args, "--wait", results=results, env=slurm_env)
    assert first.returncode == 0, first.stderr[-3000:]
    store = RunStore(results)
    runs = [r for r in quick_sweep().runs if r.skip is None]
    assert len(runs) == 7
    for run in runs:
        assert store.has(run.spec.run_id), run.spec.run_id
        pointer = read_pointer(store, run.spec.run_id)
        assert re.fullmatch(r"\d+_\d+", pointer["job_id"])
        assert Path(pointer["log"]).exists()  # the job's log, under results/slurm/<sweep id>/
    assert len({read_pointer(store, r.spec.run_id)["sweep_id"] for r in runs}) == 1

    status = hydrabench(*args, "--status", results=results, env=slurm_env)
    assert states(status.stdout) == {r.spec.run_id: "done" for r in runs}, status.stdout
    rerun = hydrabench(*args, results=results, env=slurm_env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "nothing to submit" in rerun.stderr
    assert len(list((results / "slurm").iterdir())) == 1  # no second sweep folder, no new jobs


@pytest.mark.slow
def test_slurm_job_of_two_tasks_is_one_two_process_training(slurm_env: dict[str, str],
                                                            tmp_path: Path) -> None:
    """A profile of the user's own (a .yaml path) asking for 2 tasks per job: submitit starts
    2 processes that train as one torch.distributed group, as torchrun would."""
    profile = tmp_path / "two-tasks.yaml"
    profile.write_text("extends: tiny\nslurm: {tasks: 2, cpus: 1, mem: 4G, time_min: 20}\n")
    results = tmp_path / "results"
    args = ("sweep", "table1", "--profile", str(profile), "--executor", "slurm", "--rows", "1",
            *QUICK)
    done = hydrabench(*args, "--wait", results=results, env=slurm_env)
    assert done.returncode == 0, done.stderr[-3000:]
    (record_path,) = results.glob("runs/*/record.json")
    record = json.loads(record_path.read_text())
    assert record["spec"]["profile"] == str(profile)
    assert record["training"]["train"]["processes"] == 2
    assert record["training"]["train"]["strategy"] == "ddp"
    assert states(hydrabench(*args, "--status", results=results, env=slurm_env).stdout) == {
        record["run_id"]: "done"}


def test_an_sbatch_that_names_no_job_id_is_one_line_that_says_jobs_may_be_queued(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A site's sbatch wrapper that exits 0 but prints no "job <id>" (submitit then raised a
    FailedSubmissionError traceback): one line, exit 2, no pointer written, and the job folder
    kept, since jobs may be queued that need its scripts. The wrapper is a stand-in (a fake):
    this machine's Slurm always names the job."""
    from conftest import error_lines

    from hydrabench.cli import main

    wrapper = tmp_path / "bin" / "sbatch"
    wrapper.parent.mkdir()
    wrapper.write_text("#!/bin/sh\necho 'queued by the site wrapper'\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    assert main(["sweep", "table1", "--executor", "slurm", "--rows", "1", *QUICK]) == 2
    stderr = capsys.readouterr().err
    (error,) = error_lines(stderr)
    assert "sbatch exited 0 but its output named no job id ('queued by the site wrapper')" in error
    assert "check squeue before sweeping again" in error
    assert "Traceback" not in stderr
    (folder,) = (tmp_path / "results" / "slurm").iterdir()
    assert str(folder) in error and any(folder.iterdir())
    assert not list((tmp_path / "results").glob("runs/*.slurm.json"))


def test_a_job_array_sbatch_refuses_is_one_line_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The real sbatch, through submitit's real SlurmExecutor, given a Slurm configuration it
    cannot process (it refuses at once, as a cluster refuses a partition or resources it does
    not have): one line with sbatch's message, exit 2, and no pointer file, job folder or
    results/ left (submitit's traceback was 35 lines)."""
    from conftest import error_lines

    from hydrabench.cli import main

    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        pytest.skip("Slurm's sbatch and srun are not installed here")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=nowhere\nNoSuchSetting=1\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    assert main(["sweep", "table1", "--executor", "slurm", "--rows", "1", *QUICK]) == 2
    stderr = capsys.readouterr().err
    (error,) = error_lines(stderr)
    assert "sbatch refused the sweep's job array of 1 run, nothing was submitted: " in error
    assert "NoSuchSetting" in error  # sbatch's own words
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) < 10, stderr
    assert not (tmp_path / "results").exists()
