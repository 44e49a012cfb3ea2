"""The suite on a GPU box: the processes tests start for CPU runs see no CUDA device (else a
tiny run's torchrun group would choose NCCL, its meter the GPU's counters), tests that start
vLLM opt in, and tests of 2 ranks skip where CUDA has 1 device. No CUDA exists on the machines
the suite is developed on, so the device counts below are a fake (torch.cuda patched)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import child_env, start, too_few_gpus

TESTS = Path(__file__).resolve().parent
# A stand-in for the CLI: `start` runs `LAUNCHER -m hydrabench.cli ARGS`; this one prints what
# the child sees instead.
SHOW_CUDA = [sys.executable, "-c",
             "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"]


def seen_by_child(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out.strip()


def test_started_processes_see_no_cuda_unless_they_opt_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # what a GPU box's shell may set
    assert seen_by_child(start([], tmp_path / "results", SHOW_CUDA)) == "''"
    assert seen_by_child(start([], tmp_path / "results", SHOW_CUDA, cuda=True)) == "'0,1'"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # unset: every GPU visible, unless hidden
    assert seen_by_child(start([], tmp_path / "results", SHOW_CUDA)) == "''"
    assert seen_by_child(start([], tmp_path / "results", SHOW_CUDA, cuda=True)) == "None"


def test_child_env_hides_cuda_and_keeps_the_rest(tmp_path: Path) -> None:
    base = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "3"}
    env = child_env(tmp_path, base=base, OMP_NUM_THREADS="1")
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                   "HYDRABENCH_RESULTS": str(tmp_path)}
    assert child_env(base=base, cuda=True) == base
    assert base == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "3"}  # the caller's dict unchanged


def test_a_child_with_cuda_hidden_finds_no_device() -> None:
    """torch itself, in a child started with child_env's environment, finds no CUDA device."""
    done = subprocess.run([sys.executable, "-c",
                           "import torch; print(torch.cuda.device_count())"],
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0"


def test_every_cli_process_a_test_starts_gets_its_environment_from_child_env() -> None:
    """Each test helper that runs `hydrabench.cli` as a process builds its environment with
    child_env (or is conftest's `start`), so none passes a GPU box's CUDA on by accident."""
    helpers = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            names = {n.value for n in ast.walk(node) if isinstance(n, ast.Constant)}
            if "hydrabench.cli" in names:
                calls = {n.func.id for n in ast.walk(node)
                         if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
                helpers.append(f"{path.name}:{node.name}")
                assert "child_env" in calls, f"{path.name}:{node.name} passes its own env"
    assert "conftest.py:start" in helpers and "test_end_to_end.py:hydrabench" in helpers


@pytest.mark.parametrize(("available", "devices", "too_few"),
                         [(False, 0, False), (True, 1, True), (True, 2, False)])
def test_two_rank_tests_skip_where_cuda_has_one_device(
        available: bool, devices: int, too_few: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake CUDA (none exists here): 2 ranks run as CPU processes without CUDA, on 2 GPUs with
    it, and not on 1."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    assert too_few_gpus(2) is too_few
