"""Shared test set-up: offline hub, a persistent cache for the tiny base model, isolated stores."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# No internet here: any accidental hub access fails at once instead of retrying. Set before
# transformers / datasets are imported, which read these variables on import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny base model takes minutes to build; build it once and reuse it across test sessions.
os.environ.setdefault("HYDRABENCH_CACHE", str(REPO / ".cache" / "hydrabench"))
# vLLM engines and servers start without torch.compile and run an engine's model in the engine's
# own process (no engine-core and worker processes, each importing torch and vLLM): the same
# numbers, started in a third of the time (an in-process engine scoring 6 items, one core: 163 s
# as a user's default runs it, 59 s so). `vllm_as_users_run_it` gives a test the default back.
FAST_VLLM = {"TORCH_COMPILE_DISABLE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
for _name, _value in FAST_VLLM.items():
    os.environ.setdefault(_name, _value)


def vllm_as_users_run_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM processes started from here on compile and run their engine core and workers in
    processes of their own, as a user's run does (the tests' FAST_VLLM undone)."""
    for name in FAST_VLLM:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def compiled_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """This test's vLLM processes start as a user's do (`vllm_as_users_run_it`)."""
    vllm_as_users_run_it(monkeypatch)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test`, `make test-fast`): the tiny base model is built first, by
    the controlling process on every core (its weights, hence every run id, depend on the
    build's thread count), then each test process keeps to its own share of the cores. Two
    processes that each run OpenMP threads on both cores (torch's training, vLLM's engines bound
    to every core) slow each other down 2-3x: one LoRA run of `general`, 2-core EPYC, beside a
    suite's engines: 60-119 s on 2 threads, 33-35 s on 1."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        if config.getoption("numprocesses", default=None):
            from hydrabench.models import BUILTIN_TINY, resolve_model_dir

            resolve_model_dir(BUILTIN_TINY)
        return
    cores = sorted(os.sched_getaffinity(0))
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    if workers <= len(cores):  # worker k: cores k, k + n, ... (children inherit it)
        os.sched_setaffinity(0, cores[int(worker.removeprefix("gw")) :: workers])


# The files that took longest as a whole, longest first (a core per process, vLLM started as
# FAST_VLLM says: the vLLM files 6-15 minutes, the others 3-6); measured, so kept by hand when a
# file grows.
LONGEST_FILES = ("test_vllm_plugin.py", "test_vllm_backend.py", "test_benchmarks.py",
                 "test_sweep.py", "test_reliability.py", "test_distributed.py",
                 "test_make_targets.py", "test_protocols.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first, then the other files with slow tests, then the rest: pytest-xdist
    hands whole files to its processes in this order (`make test`, with --no-loadscope-reorder),
    so the long files start at once and the short ones fill in at the end instead of one long
    file running alone last (in xdist's own order, files with the most tests first, make
    reproduce-table1's test started 43 minutes in). Within a file the order is kept."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        if item.path.name in LONGEST_FILES:
            return 0, LONGEST_FILES.index(item.path.name)
        return (1 if item.path in slow_files else 2), 0

    items.sort(key=rank)


@pytest.fixture
def store_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Results and reports of this test go to a fresh directory."""
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("HYDRABENCH_REPORTS", str(tmp_path / "reports"))
    return tmp_path


@pytest.fixture
def store(tmp_path: Path):
    """An empty run store of this test's own."""
    from hydrabench.records.store import RunStore

    return RunStore(tmp_path / "results")


def torchrun(processes: int) -> list[str]:
    """The real launcher, on a free local port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(port)]


def child_env(results: Path | None = None, *, cuda: bool = False,
              base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of a child process a test starts: `base` (default: this process's),
    HYDRABENCH_RESULTS=`results`, `extra`, and no CUDA device unless `cuda`. The tests mean
    CPU (tiny is a CPU profile, torchrun groups use gloo): on a GPU box a child that sees the
    GPU would choose it (NCCL, the GPU's memory counters). Tests whose child serves with vLLM
    pass cuda=True: vLLM's GPU build needs the device."""
    env = {**(os.environ if base is None else base), **extra}
    if results is not None:
        env["HYDRABENCH_RESULTS"] = str(results)
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def too_few_gpus(count: int) -> bool:
    """Whether CUDA exists with fewer than `count` devices: a test of `count` ranks runs them as
    CPU processes where there is no CUDA, one per GPU where there is."""
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() < count


def start(args: list[str], results: Path, launcher: list[str] | None = None, *,
          cuda: bool = False) -> subprocess.Popen:
    """`hydrabench ARGS` as a process (under `launcher`, e.g. torchrun), in a session of its own
    so that `kill_when` kills every process it started; CUDA hidden unless `cuda` (child_env)."""
    env = child_env(results, cuda=cuda, OMP_NUM_THREADS="1")
    return subprocess.Popen([*(launcher or [sys.executable]), "-m", "hydrabench.cli", *args],
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return err


def kill_when(proc: subprocess.Popen, results: Path, pattern: str) -> None:
    """SIGKILL `proc` and its children as soon as a path matching `pattern` appears under
    `results` (a whole-node failure when they are torchrun's workers)."""
    deadline = time.monotonic() + 300
    while not list(results.glob(pattern)):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{pattern} never appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def artifact_info(results: Path) -> dict:
    (marker,) = results.glob("artifacts/*/artifact.json")
    return json.loads(marker.read_text())


def error_lines(stderr: str) -> list[str]:
    """hydrabench's own error lines in `stderr`."""
    return [line for line in stderr.splitlines() if line.startswith("hydrabench: error:")]


def assert_refused_in_one_line(argv: list[str], message: str, results: Path,
                               capsys: pytest.CaptureFixture) -> None:
    """`hydrabench ARGV`, in-process: exit 2, one error line saying `message`, and nothing
    written under `results`."""
    from hydrabench.cli import main

    assert main(argv) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and message in errors[0], errors
    assert not results.exists()


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real disk that fills up: a tmpfs of `size` at `path`. Mounting needs root; elsewhere
    the test is skipped (said so)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def sandboxes_started_since(children_before: set[int]) -> list[psutil.Process]:
    """The sandboxes (each bwrap and everything below it) started by this process since it had
    the children `children_before` (their pids when a test began): what the test started, not
    what an earlier test in this pytest process left running (a worker runs many files). A child
    not yet bwrap is left out: between subprocess's vfork and its exec it shares this process's
    memory and reports all of it (the likeliest reading of CI's 682 MiB, a worker's size)."""
    found = []
    for child in psutil.Process().children():
        if child.pid not in children_before:
            with contextlib.suppress(psutil.Error):
                if child.name() == "bwrap":
                    found += [child, *child.children(recursive=True)]
    return found


def children_now() -> set[int]:
    """The pids of this process's children, for sandboxes_started_since."""
    return {child.pid for child in psutil.Process().children()}
