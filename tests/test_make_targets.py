"""The README's two set-up commands, run as a user runs them (`make test` is this suite itself).

`make reproduce-table1` trains and scores every row of Table 1 on the tiny default (about 3
minutes on 2 cores once installed); its results and reports go to a temporary folder here.
"""

import csv
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import child_env

REPO = Path(__file__).resolve().parents[1]


def make(target: str, tmp_path: Path, *variables: str) -> subprocess.CompletedProcess:
    env = child_env(tmp_path / "results", HYDRABENCH_REPORTS=str(tmp_path / "reports"))
    return subprocess.run(["make", "--no-print-directory", target, *variables], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1800)


def dry_run(target: str, *variables: str) -> str:
    """What `make -n target` prints, as a user's shell runs it: not under this suite's own make
    (whose MAKEFLAGS and MAKELEVEL would add "Entering directory" lines) nor its SEEDS."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "SEEDS")}
    run = subprocess.run(["make", "-n", target, *variables], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.slow
def test_make_reproduce_table1_writes_every_row_and_reuses_its_records(tmp_path: Path) -> None:
    first = make("reproduce-table1", tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    reports = tmp_path / "reports"
    assert {p.suffix for p in reports.glob("table1.*")} >= {".md", ".csv", ".tex"}
    planned = int(re.search(r"plan: table1 on profile tiny: (\d+) runs, 0 already done",
                            first.stderr)[1])
    with (reports / "table1.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= planned - 1  # a row per run (the base model's may be apart)
    records = sorted((tmp_path / "results" / "runs").glob("*/record.json"))
    assert len(records) == planned

    again = make("reproduce-table1", tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{planned} runs, {planned} already done, 0 to run" in again.stderr
    assert sorted((tmp_path / "results" / "runs").glob("*/record.json")) == records


def test_make_reproduce_passes_the_seeds_on() -> None:
    assert "reproduce table1 --profile tiny --seeds 0,1,2" in dry_run("reproduce-table1",
                                                                      "SEEDS=0,1,2")


def test_make_reproduce_claims_runs_the_claims_on_three_seeds_a_run_per_core() -> None:
    cores = len(os.sched_getaffinity(0))  # what nproc counts (a test process may have one)
    assert (f"hydrabench claims --profile tiny --seeds 0,1,2 --jobs {min(cores, 4)}"
            in dry_run("reproduce-claims"))
    assert "--jobs 1" in dry_run("reproduce-claims", "JOBS=1")
    assert "claims --profile paper --seeds 0,1,2 --jobs 1" in dry_run("reproduce-claims",
                                                                       "PROFILE=paper")


def test_make_reproduce_successors_takes_the_tables_seeds_unless_given() -> None:
    """The table spec's seeds (0, 1, 2) by default, not SEEDS's default of one seed."""
    def dry(*variables: str) -> list[str]:
        """The hydrabench command's arguments the target runs."""
        return dry_run("reproduce-successors", *variables).splitlines()[-1].split()[1:]

    table = ["reproduce", "successors", "--profile", "tiny"]
    assert dry() == table
    assert dry("SEEDS=1") == [*table, "--seeds", "1"]
    assert dry("ALLOW_CODE_EXECUTION=1") == [*table, "--allow-code-execution"]
