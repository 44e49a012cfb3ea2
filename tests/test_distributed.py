"""Training in 2 processes (torchrun, gloo on CPU) reaches the loss of 1 process with the same
global batch and seed. Real processes and the real launcher; dropout 0 so the two are comparable
(with dropout each process would draw its own masks)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["run", "--method", "lora", "--task", "medical", "--max-steps", "8", "--batch-size", "8",
        "--dropout", "0", "--limit", "2"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(launcher: list[str], results: Path) -> dict:
    env = {**os.environ, "HYDRABENCH_RESULTS": str(results), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, "-m", "hydrabench.cli", *ARGS], env=env, text=True,
                          capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (marker,) = results.glob("artifacts/*/artifact.json")
    return json.loads(marker.read_text())["train"]


def test_two_processes_match_one(tmp_path: Path) -> None:
    single = run([sys.executable], tmp_path / "single")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    double = run(torchrun, tmp_path / "double")
    assert (single["processes"], double["processes"]) == (1, 2)
    assert double["steps"] == single["steps"] == 8
    assert double["trained_tokens"] == single["trained_tokens"]
    # Same global batch: the same losses up to float32 summation order across 2 processes.
    assert double["first_loss"] == pytest.approx(single["first_loss"], rel=1e-5)
    assert double["final_loss"] == pytest.approx(single["final_loss"], rel=1e-4)
    records = list((tmp_path / "double").glob("runs/*/record.json"))
    assert len(records) == 1  # rank 0 alone writes
