"""`--jobs N` (sweep, reproduce, claims): N runs at once on a CPU, each in a process of its own
with its share of the cores. Bad input is refused before any work; real tiny runs in two
processes; a job process killed -9 is one line, and the same command again finishes the rest."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_refused_in_one_line, child_env, error_lines

from hydrabench.records.store import ASIDE, COMPLETE, RunStore

# Three rows of Table 1, a few steps and items each: the parallel path, not the scores.
SWEEP = ["sweep", "table1", "--rows", "1,2,3", "--max-steps", "3", "--limit", "4"]


@pytest.mark.parametrize(("argv", "message"), [
    ([*SWEEP, "--jobs", "0"], "--jobs must be 1 or more, got 0"),
    ([*SWEEP, "--jobs", "2", "--executor", "slurm"], "--jobs is for --executor local"),
    (["reproduce", "table1", "--profile", "paper", "--jobs", "2"],
     "--jobs 2: profile paper runs on device 'auto'"),
    (["claims", "--profile", "vllm.yaml", "--jobs", "2"], "is scored by vLLM"),
])
def test_jobs_that_cannot_share_a_cpu_are_refused_before_any_work(
        argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vllm.yaml").write_text("extends: tiny\nname: tiny-vllm\neval: {backend: vllm}\n")
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    assert_refused_in_one_line(argv, message, tmp_path / "results", capsys)


@pytest.mark.slow
def test_a_sweep_in_two_processes_and_a_job_killed_midway(tmp_path: Path) -> None:
    """A job killed -9 as it places its first result (HYDRABENCH_KILL_AT: every job dies there)
    is one error line, and the same command again finishes every run, with nothing
    half-written left; each run trained on one thread of its own (two processes, two cores)."""
    results = tmp_path / "results"
    cli = [sys.executable, "-m", "hydrabench.cli", *SWEEP, "--jobs", "2"]
    killed = subprocess.run(cli, env=child_env(results, HYDRABENCH_KILL_AT="complete"),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == 2, killed.stderr[-3000:]
    errors = error_lines(killed.stderr)
    assert len(errors) == 1 and "a run's process died" in errors[0], killed.stderr[-3000:]

    again = subprocess.run(cli, env=child_env(results), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 at a time, " in again.stderr
    store = RunStore(results)
    records = [store.load(p.name) for p in store.runs.iterdir() if p.is_dir()]
    assert len(records) == 3 and all(r.metrics for r in records)
    assert {r.provenance.hardware["torch_threads"] for r in records} == {1}
    assert not [p for p in results.rglob("*") if p.name.startswith((".staging-", COMPLETE, ASIDE))]
    # A third time: every run is found finished, none runs again.
    done = subprocess.run(cli, env=child_env(results), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "3 already done, 0 to run" in done.stderr
