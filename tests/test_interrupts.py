"""Ctrl-C, kill -9 and dead servers leave one line and nothing behind (issue 32, item 10).

Fake vLLM processes stand in where what is tested is what the harness does around them (how it
stops a process group, what it removes, what it says): a real engine takes a minute to start
here, and the fakes do what the reported engines did (ignore SIGTERM, fill TMPDIR, die of a
signal with nothing but INFO lines in their log).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import child_env
from test_teardown import leaving, stand_in_server

from hydrabench.serving.inprocess import ENGINE_LOG
from hydrabench.serving.server import ServerError, remove_scratch, vllm_scratch

# lm-eval's in-process vllm model replaced by one that starts an "engine" process of its own
# (as vLLM's does, in the child's process group), both ignoring SIGTERM, fills its TMPDIR as
# vLLM's compiled header does (1 MB here, ~150 MB there), says so and scores forever.
STUBBORN_CHILD = """
import os, signal, subprocess, sys, time
from pathlib import Path
from hydrabench.serving import inprocess

signal.signal(signal.SIGTERM, signal.SIG_IGN)

def build_engine(request):
    engine = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                               "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    Path(os.environ["TMPDIR"], "compiled-header").write_bytes(bytes(2**20))
    print(f"(EngineCore pid={engine.pid}) scoring", flush=True)
    return engine

def run_lm_eval(lm, tasks, **settings):
    time.sleep(600)

inprocess.build_engine = build_engine
inprocess.run_lm_eval = run_lm_eval
inprocess.main(Path(sys.argv[1]))
"""

# Makes lm-eval's in-process engine the stubborn child above, then runs what follows.
USE_STUBBORN_CHILD = f"""
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's Ctrl-C finds it
from hydrabench.serving import inprocess
inprocess._child_command = lambda scratch: [sys.executable, "-c", {STUBBORN_CHILD!r},
                                            str(scratch)]
"""


def engine_pids(log: Path, timeout_s: float = 300) -> list[int]:
    """The child's pid and its engine's, once the engine scores (its log says so)."""
    deadline = time.monotonic() + timeout_s
    while "scoring" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "the engine never started scoring"
        time.sleep(0.1)
    engine = int(log.read_text().split("(EngineCore pid=")[1].split(")")[0])
    return [psutil.Process(engine).ppid(), engine]


def gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)


@pytest.fixture
def tmpdir_short() -> Iterator[Path]:
    """A TMPDIR short enough that vLLM's scratch stays in it (see `vllm_scratch`)."""
    path = Path(tempfile.mkdtemp(prefix="hb-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def scratch_dirs(tmpdir: Path) -> list[Path]:
    return sorted(tmpdir.glob("hydrabench-vllm-*"))


# -- Ctrl-C ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_during_scoring_is_one_line_and_ends_a_stubborn_engine_at_once(
        tmp_path: Path, tmpdir_short: Path):
    """`hydrabench eval --backend vllm` stopped by Ctrl-C while its in-process engine scores:
    one line saying what is kept, exit 130, no traceback, the engine's processes (which ignore
    SIGTERM) gone within a few seconds, not after a 30 s grace, and its scratch removed."""
    tmpdir = tmpdir_short
    script = USE_STUBBORN_CHILD + (
        "from hydrabench.cli import main\n"
        "sys.exit(main(['eval', '--model', 'builtin:tiny', '--task', 'medical', '--limit', '2',"
        " '--backend', 'vllm']))\n")
    harness = subprocess.Popen([sys.executable, "-c", script], text=True, stderr=subprocess.PIPE,
                               env=child_env(tmp_path / "results", TMPDIR=str(tmpdir)))
    logs = tmp_path / "results"  # the engine's log is in the run's staging folder
    try:
        deadline = time.monotonic() + 300
        while not list(logs.rglob(ENGINE_LOG)):
            assert harness.poll() is None and time.monotonic() < deadline, harness.stderr.read()
            time.sleep(0.2)
        pids = engine_pids(next(logs.rglob(ENGINE_LOG)))
        assert scratch_dirs(tmpdir)
        harness.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        _, stderr = harness.communicate(timeout=60)
        assert time.monotonic() - interrupted < 10
    finally:
        harness.kill()
    assert harness.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("hydrabench: interrupted; finished runs and trained artifacts are "
                           "kept"), stderr
    assert gone(pids)
    assert not scratch_dirs(tmpdir)


def test_ctrl_c_stops_a_server_that_ignores_sigterm_within_seconds(tmp_path: Path):
    """A server (a stand-in that ignores SIGTERM: vLLM's does end on it, the reported engine did
    not) whose `with` block a Ctrl-C leaves: killed after a short grace, not its 30 s."""
    server = stand_in_server(tmp_path, "import signal, time\n"
                                       "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                       "print('serving', flush=True)\ntime.sleep(600)\n")
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), leaving(server):
        raise KeyboardInterrupt
    assert time.monotonic() - started < 10
    assert server.process.returncode == -signal.SIGKILL
    assert server.teardown is None  # a stop it was asked for, no crash to note


def test_interrupted_command_is_one_line_and_exit_130(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture):
    from hydrabench import cli

    def interrupted(args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "list", interrupted)
    assert cli.main(["list", "methods"]) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == ["hydrabench: interrupted; finished runs and trained artifacts "
                                "are kept (a rerun resumes a training from its last checkpoint)"]


# -- kill -9 -----------------------------------------------------------------------------------


def test_kill_9_during_in_process_scoring_leaves_no_scratch(tmp_path: Path,
                                                             tmpdir_short: Path):
    """The harness killed with -9 while its in-process engine scores runs no `finally`: the
    child notices its parent is gone, removes its scratch (vLLM's ~150 MB) and ends its group."""
    tmpdir = tmpdir_short
    script = USE_STUBBORN_CHILD + (
        "from pathlib import Path\n"
        "from hydrabench.serving.inprocess import Engine, score_in_child\n"
        f"score_in_child(Path({str(tmp_path)!r}), ['medical'], Engine(),"
        f" log_dir=Path({str(tmp_path)!r}), limit=2, seed=0)\n")
    harness = subprocess.Popen([sys.executable, "-c", script], env={**os.environ,
                                                                    "TMPDIR": str(tmpdir)})
    try:
        pids = engine_pids(tmp_path / ENGINE_LOG, timeout_s=60)
        (scratch,) = scratch_dirs(tmpdir)
        assert (scratch / "tmp" / "compiled-header").stat().st_size == 2**20
    finally:
        harness.kill()
    harness.wait()
    deadline = time.monotonic() + 10
    while scratch.exists() or not gone(pids):
        assert time.monotonic() < deadline, (list(scratch.rglob("*")), pids)
        time.sleep(0.1)


HOLD_SCRATCH = """
import sys, tempfile, time
tempfile.tempdir = sys.argv[1]
from hydrabench.serving.server import vllm_scratch
scratch = vllm_scratch("hydrabench-vllm-engine-")
(scratch / "tmp" / "compiled-header").write_bytes(bytes(2**20))
print(scratch, flush=True)
time.sleep(600)
"""


def test_next_scratch_removes_those_of_dead_processes_only(tmpdir_short: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    """A harness killed with -9 before its child could clean up (here: before it started one)
    leaves its scratch; the next vLLM start in that TMPDIR removes it. A live process's scratch
    stays, and so does the kept log of a failed engine (named in an error line)."""
    holders = [subprocess.Popen([sys.executable, "-c", HOLD_SCRATCH, str(tmpdir_short)],
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    dead, live = (Path(holder.stdout.readline().strip()) for holder in holders)
    holders[0].kill()
    holders[0].wait()
    failed_log = Path(tempfile.mkdtemp(prefix="hydrabench-vllm-failed-", dir=tmpdir_short))
    (failed_log / "vllm_engine.log").write_text("ValueError: no\n")
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(tmpdir_short))
        new = vllm_scratch("hydrabench-vllm-")
        assert not dead.exists()
        assert (live / "tmp" / "compiled-header").exists()
        assert (failed_log / "vllm_engine.log").exists()
        assert (new / "tmp").is_dir()
        assert sorted(scratch_dirs(tmpdir_short)) == sorted([live, failed_log, new])
        remove_scratch(new)
    finally:
        holders[1].kill()
        holders[1].wait()


# -- a server that dies while it serves ---------------------------------------------------------

# A stand-in server whose log has only vLLM's routine lines when it is killed (vLLM logs nothing
# on a SIGKILL: the OOM killer's, or a kill -9). Its failure's kept log goes to `tmp_path`.
ROUTINE_LOG = """
print("(APIServer pid=1) INFO 12-01 21:42:41 [api_server.py:1] Starting vLLM API server")
print("(APIServer pid=1) INFO 12-01 21:42:50 [loggers.py:1] Avg prompt throughput: 9.1 tokens/s")
print("(APIServer pid=1) INFO 12-01 21:42:51 [launcher.py:1] serving", flush=True)
import time
time.sleep(600)
"""


@pytest.fixture
def tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile's folder (where a failure keeps the server's log) in this test's own."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_server_killed_while_serving_names_the_signal_not_an_info_line(tempdir: Path):
    tmp_path = tempdir
    server = stand_in_server(tmp_path, ROUTINE_LOG)
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    with pytest.raises(ServerError) as raised, leaving(server):
        server.raise_if_dead()
    message = str(raised.value)
    assert "vLLM server stopped while serving (killed by signal 9 (SIGKILL))" in message
    assert "INFO" not in message and "no error in its log" in message
    kept = Path(message.rsplit("(server log: ", 1)[1].rstrip(")"))
    assert "Avg prompt throughput" in kept.read_text()
    assert server.teardown is None


def test_server_that_exited_names_its_exit_code(tempdir: Path):
    tmp_path = tempdir
    server = stand_in_server(tmp_path, ROUTINE_LOG.replace("import time",
                                                           "import os; os._exit(3)"))
    server.process.wait()
    with pytest.raises(ServerError, match=r"stopped while serving \(exit code 3\): no error"):
        server.raise_if_dead()
    server.stop()


def test_error_line_is_still_the_cause_when_the_log_has_one(tempdir: Path):
    tmp_path = tempdir
    program = ROUTINE_LOG.replace(
        "import time", 'print("(APIServer pid=1) ERROR 12-01 21:42:52 [core.py:1] '
                       'RuntimeError: engine core died", flush=True)\nimport time')
    server = stand_in_server(tmp_path, program)
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    with pytest.raises(ServerError, match=r"\(SIGKILL\)\): RuntimeError: engine core died"):
        server.raise_if_dead()
    server.stop()
