"""An engine that crashes after it handed over complete scores does not fail the run (issue 32,
item 5): the in-process child (`inprocess_vllm`) and the server (`serving.VllmServer`).

The in-process tests run the real child's `main` (its hand-over, its teardown order) with a
stand-in for lm-eval's vllm model and for lm-eval's scoring: starting a real engine takes a
minute here, and what is tested is what the child does around them. The stand-in aborts where
vLLM's engine aborted in the reported runs: when it is torn down, after scoring.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hydrabench.serving import inprocess as inprocess_vllm
from hydrabench.serving.inprocess import ENGINE_LOG, SCORES, Engine, score_in_child
from hydrabench.serving.server import LOG_NAME, ServerError, VllmServer

TASKS = ["mmlu_high_school_geography", "tiny_medical"]

FAKE_CHILD = """
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydrabench.serving import inprocess as inprocess_vllm
from hydrabench.evaluation.harness import TaskScore

mode = sys.argv[2]


class Model:  # lm-eval's vllm model without vLLM; vLLM's engine aborted when torn down
    def __del__(self):
        if mode == "abort-at-teardown":
            os.abort()


def run_lm_eval(lm, tasks, **settings):
    if mode == "abort-while-scoring":
        os.abort()
    return {task: TaskScore(task, {"acc,none": 0.25 + k / 8}, {"acc,none": 0.05}, "acc,none",
                            60, 0, 1.0) for k, task in enumerate(tasks)}


def garbled(scratch, tasks, scores):
    (scratch / inprocess_vllm.SCORES).write_text('{"tasks": ["other"], "scores": {}}')


inprocess_vllm.build_engine = lambda request: Model()
inprocess_vllm.run_lm_eval = run_lm_eval
if mode == "garbled-hand-over":
    inprocess_vllm.hand_over = garbled
inprocess_vllm.main(Path(sys.argv[1]))
"""


@pytest.fixture
def child(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """`mode.append(m)` picks what the stand-in child does (see FAKE_CHILD)."""
    mode: list[str] = []
    monkeypatch.setattr(inprocess_vllm, "_child_command",
                        lambda scratch: [sys.executable, "-c", FAKE_CHILD, str(scratch), *mode])
    return mode


def score(tmp_path: Path) -> tuple[dict, dict]:
    return score_in_child(tmp_path, TASKS, Engine(), log_dir=tmp_path / "run", limit=60, seed=0)


def test_abort_after_the_hand_over_keeps_the_scores_and_notes_the_crash(
        tmp_path: Path, child: list[str], capsys: pytest.CaptureFixture):
    child.append("abort-at-teardown")
    scores, info = score(tmp_path)
    assert {task: s.value for task, s in scores.items()} == {
        "mmlu_high_school_geography": 0.25, "tiny_medical": 0.375}
    assert scores["tiny_medical"].n_samples == 60
    assert info["engine"] == "in-process" and info["log"] == ENGINE_LOG
    assert info["startup_s"] >= 0
    assert info["teardown"] == {"exit_code": -signal.SIGABRT, "log": ENGINE_LOG}
    warning = capsys.readouterr().err
    assert "exited with code -6 (SIGABRT) after handing over complete scores" in warning
    assert str(tmp_path / "run" / ENGINE_LOG) in warning
    assert "after handing over complete scores" in (tmp_path / "run" / ENGINE_LOG).read_text()


def test_clean_exit_has_no_teardown_note(tmp_path: Path, child: list[str]):
    child.append("clean")
    scores, info = score(tmp_path)
    assert sorted(scores) == sorted(TASKS)
    assert "teardown" not in info


def test_abort_before_the_hand_over_fails_the_run(tmp_path: Path, child: list[str]):
    child.append("abort-while-scoring")
    with pytest.raises(ServerError, match=r"vLLM engine exited with code -6 while scoring"):
        score(tmp_path)


def test_incomplete_hand_over_fails_even_with_exit_code_0(tmp_path: Path, child: list[str]):
    child.append("garbled-hand-over")
    with pytest.raises(ServerError, match=r"exited with code 0 without handing over complete"):
        score(tmp_path)


@pytest.mark.parametrize("written", [
    None,  # none
    '{"tasks": ["a"], "scores": {"a": {"task": "a"',  # cut
    '{"tasks": ["b"], "scores": {"a": %s}}',  # for another request
    '{"tasks": ["a"], "scores": {}}',  # no scores
    '{"tasks": ["a"], "scores": {"b": %s}}',  # a score under another task's name
    '{"tasks": ["a"], "scores": {"a": {"task": "a", "metrics": {}}}}',  # not a TaskScore
    '{"tasks": ["a"], "scores": {"a": %s}, "x": 1}'.replace("%s", '{"task": "a"}'),
    '[1, 2]',
])
def test_handed_over_accepts_only_complete_scores(tmp_path: Path, written: str | None):
    """Complete: the envelope the child writes (renamed into place) once lm-eval returned for
    every task of this request. Groups expand into their tasks' rows (a group without its own
    aggregate has none), so the rows are not matched name by name against the request."""
    score_a = {"task": "a", "metrics": {"acc,none": 0.5}, "stderr": {"acc,none": None},
               "primary": "acc,none", "n_samples": 3, "n_shot": 0, "version": 1}
    (tmp_path / SCORES).write_text(json.dumps({"tasks": ["a"], "scores": {"a": score_a}}))
    assert inprocess_vllm.handed_over(tmp_path, ["a"])["a"].value == 0.5
    assert inprocess_vllm.handed_over(tmp_path, ["a", "b"]) is None  # asked for another list
    (tmp_path / SCORES).unlink()
    if written is not None:
        (tmp_path / SCORES).write_text(written.replace("%s", json.dumps(score_a)))
    assert inprocess_vllm.handed_over(tmp_path, ["a"]) is None


# The server hands its scores over HTTP while it serves: a crash when it is stopped comes after
# them. A stand-in process (no vLLM server: what is tested is `stop`) aborts on SIGTERM as
# vLLM's engine did at exit.
ABORT_ON_SIGTERM = """
import os, signal, time
signal.signal(signal.SIGTERM, lambda *_: os.abort())
print("serving", flush=True)
time.sleep(600)
"""


def stand_in_server(tmp_path: Path, program: str) -> VllmServer:
    server = VllmServer(tmp_path, log_dir=tmp_path, stop_grace_s=30.0)
    with open(server.log_path, "ab") as log:
        server.process = subprocess.Popen([sys.executable, "-c", program], stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
    while "serving" not in server.log_path.read_text():  # its SIGTERM handler is set
        time.sleep(0.05)
    server.startup_s = 0.0  # it came up
    return server


@contextmanager
def leaving(server: VllmServer) -> Iterator[None]:
    """The end of `with server:` for a server already started (`__enter__` starts vLLM)."""
    try:
        yield
    except BaseException as err:
        server.__exit__(type(err), err, err.__traceback__)
        raise
    server.__exit__(None, None, None)


def test_server_aborting_at_stop_is_a_teardown_note(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture):
    server = stand_in_server(tmp_path, ABORT_ON_SIGTERM)
    with leaving(server):  # the block's end does not raise
        pass
    assert server.teardown == {"exit_code": -signal.SIGABRT, "log": LOG_NAME}
    warning = capsys.readouterr().err
    assert "vLLM server exited with code -6 (SIGABRT) when stopped" in warning
    assert str(tmp_path / LOG_NAME) in warning


def test_server_crashed_before_stop_is_noted_too(tmp_path: Path):
    server = stand_in_server(tmp_path, 'import os; print("serving", flush=True); os._exit(3)')
    server.process.wait()
    server.stop()
    assert server.teardown == {"exit_code": 3, "log": LOG_NAME}


def test_server_stopping_cleanly_has_no_teardown_note(tmp_path: Path):
    server = stand_in_server(tmp_path, 'print("serving", flush=True)\nimport time\n'
                                       'time.sleep(600)')
    server.stop()  # SIGTERM's default: exit -15, as asked
    assert server.teardown is None


def test_server_that_failed_while_serving_gets_no_teardown_note(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture):
    """Its failure was the run's error: no warning that its scores stand."""
    server = stand_in_server(tmp_path, 'import os; print("serving", flush=True); os._exit(3)')
    server.process.wait()
    with pytest.raises(ServerError, match="stopped while serving"), leaving(server):
        server.raise_if_dead()
    assert server.teardown is None
    assert "warning" not in capsys.readouterr().err


def test_server_block_that_raised_gets_no_teardown_note(tmp_path: Path):
    server = stand_in_server(tmp_path, ABORT_ON_SIGTERM)
    with pytest.raises(RuntimeError), leaving(server):
        raise RuntimeError("lm-eval failed")
    assert server.process.returncode == -signal.SIGABRT
    assert server.teardown is None
