"""Progress with the time left (issue 31): the rate and ETA arithmetic and wording, the log lines
of a long phase, and each run of a reproduce/sweep. No timings: elapsed times are given, or only
the wording of a measured one is checked."""

import re
from pathlib import Path

import pytest
from test_report import make_record

from hydrabench.atomic import write_json_atomic
from hydrabench.config.tables import load_table
from hydrabench.pipeline.sweep import plan_sweep
from hydrabench.progress import LogProgress, duration, eta, rate, report_progress
from hydrabench.records.store import RunStore


@pytest.mark.parametrize(("seconds", "text"), [
    (0.4, "0 s"), (40, "40 s"), (89, "89 s"), (540, "9 min"), (3500, "58 min"),
    (3570, "1 h 00 min"),
    (3600, "1 h 00 min"), (7500, "2 h 05 min"), (-3, "0 s")])
def test_duration_reads_as_a_person_would(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_rate_takes_the_unit_that_gives_a_number_above_one() -> None:
    assert rate(30, 10, "steps") == "3 steps/s"
    assert rate(150, 10, "steps") == "15 steps/s"
    assert rate(1, 20, "runs") == "3 runs/min"
    assert rate(12, 232.26, "runs") == "3.1 runs/min"
    assert rate(1, 7200, "runs") == "0.5 runs/h"


def test_eta_from_the_rate_so_far() -> None:
    # 12 runs in 232 s is 3.1 runs/min; the 28 left take 28 / 3.1 = 9.0 min.
    assert eta(12, 40, 232.26) == "12/40 runs, 3.1 runs/min, ETA 9 min"
    assert eta(1, 4, 30.0) == "1/4 runs, 2 runs/min, ETA 2 min"
    assert eta(10, 100, 5.0, "steps") == "10/100 steps, 2 steps/s, ETA 45 s"


def test_eta_of_a_resumed_phase_times_only_this_session() -> None:
    # Resumed at step 30 of 100: 10 steps in 20 s, so the 60 left take 120 s (not 30 s, as
    # counting the 30 steps done before would say).
    assert eta(40, 100, 20.0, "steps", initial=30) == "40/100 steps, 30 steps/min, ETA 2 min"


def test_eta_unknown_before_anything_is_timed_and_took_at_the_end() -> None:
    assert eta(0, 5, 0.0) == "0/5 runs, ETA unknown"
    assert eta(3, 5, 10.0, initial=3) == "3/5 runs, ETA unknown"
    assert eta(5, 5, 600.0) == "5/5 runs, 30 runs/h, took 10 min"
    assert eta(0, 0, 0.0) == "0/0 runs, done"


def test_log_line_carries_the_rate_and_time_left() -> None:
    steps = LogProgress(range(0), "training", total=20, initial=3, unit="steps")
    steps.done = 13
    steps.set_postfix(loss="0.250")
    assert steps.line(10.0) == "training: 13/20 (65%), 1 steps/s, ETA 7 s, loss 0.250"
    # Without a unit (the old callers), the line stays as it was.
    assert LogProgress(range(0), "x", total=4).line(10.0) == "x: 0/4 (0%)"


def test_long_phases_log_eta_without_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """Training and the tiny base model's build go through report_progress: in logs (stderr is
    not a terminal under pytest) each line has the rate and the time left, the last the total."""
    for _ in report_progress(range(10), "training", total=10):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10
    for line in lines[:-1]:
        assert re.fullmatch(r"\[hydrabench\] training: \d/10 \(\d0%\), (ETA unknown|[\d.e+]+ "
                            r"steps/(s|min|h), ETA \d+ (s|min))", line), line
    assert re.fullmatch(r"\[hydrabench\] training: 10/10 \(100%\), ([\d.e+]+ steps/(s|min|h), "
                        r"took \d+ s|done)", lines[-1]), lines[-1]


def test_reproduce_logs_each_run_with_the_time_left(store_env: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`make reproduce-table1` runs `hydrabench reproduce table1`, whose sweep logs each run with
    the runs left and the ETA; a run already finished is neither counted nor timed. `execute`
    stands in for the runner (it writes the record at once), as test_report's reproduce test."""
    table = load_table("table1")
    sweep = plan_sweep(table, "tiny", (0,), execute=lambda spec, **_: None)
    runnable = [run for run in sweep.runs if run.skip is None]
    store = RunStore()
    finished = runnable[0]
    write_json_atomic(store.record_path(finished.spec.run_id), make_record(finished.spec, 0))

    def execute(spec, **_) -> None:
        write_json_atomic(store.record_path(spec.run_id), make_record(spec, 0))

    sweep.execute = execute
    sweep.run_local()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "→" in line]
    todo = len(runnable) - 1
    assert len(lines) == len(runnable) and todo >= 2
    assert lines[0].endswith(f"→ {finished.spec.run_id}")  # finished: no ETA, not counted
    assert lines[1].endswith(f"; 0/{todo} runs, ETA unknown")
    for k, line in enumerate(lines[2:], start=1):
        assert re.search(rf"; {k}/{todo} runs, [\d.e+]+ runs/(s|min|h), ETA \d+ (s|min)$",
                         line), line
    assert re.search(rf"^\[hydrabench\] ran {todo}/{todo} runs, [\d.e+]+ runs/(s|min|h), "
                     rf"took \d+ s$", err, re.MULTILINE), err
