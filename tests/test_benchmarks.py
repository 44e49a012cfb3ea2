"""The benchmark scripts `make bench` runs, at their smallest sizes: they run, end with their
headline JSON, and write their report where HYDRABENCH_REPORTS says. Figures are not judged here
(a loaded CI machine gives no figure); what is judged is what would make a figure wrong: a vLLM
path that stopped being exact, a path that no longer runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_vllm_backend import vllm_available

# The benchmark scripts as processes, with vLLM engines: `make test`, not the fast tier.
pytestmark = pytest.mark.slow

__all__ = ["vllm_available"]  # a fixture the test uses

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
EXACT = 1e-4  # per loglikelihood request, nats (float32 on both sides measures ~7e-6)


def bench(script: str, *args: str, reports: Path) -> dict:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--threads", "1", *args],
        capture_output=True, text=True, timeout=1500,
        env={**os.environ, "HYDRABENCH_REPORTS": str(reports), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    headline = json.loads(result.stdout.strip().splitlines()[-1])
    report = json.loads((reports / "bench" / f"{script.removesuffix('.py')}.json").read_text())
    # The report holds the headline (its load figure unrounded) and the machine it ran on.
    del headline["other_processes_cores_busy"]
    assert {k: report[k] for k in headline} == headline and report["hardware"]["cpu_model"]
    return headline


@pytest.mark.slow
def test_bench_eval_measures_every_exact_path(vllm_available: None, tmp_path: Path) -> None:
    """hf, the served checkpoint, the plugin, lm-eval's in-process vllm beside them, and N runs
    on one server vs a server each; every vLLM path within EXACT of hf per request."""
    headline = bench("bench_eval.py", "--rounds", "1", "--limit", "3", "--runs", "1",
                     reports=tmp_path)
    assert headline["hf_tiny_medical_tokens_per_s"] > 0
    # Started as the suite starts vLLM (conftest's FAST_VLLM): its start-up figures say so.
    assert headline["vllm_settings"] == "TORCH_COMPILE_DISABLE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0"
    assert (headline["vllm"], headline["vllm_plugin"], headline["vllm_inprocess"],
            headline["vllm_plugin_inprocess"]) == ("measured",) * 4
    for backend in ("vllm", "vllm-plugin", "vllm-inprocess", "vllm-plugin-inprocess"):
        assert 0 <= headline[f"{backend}_max_abs_ll_diff"] < EXACT, backend
    assert set(headline["vllm_inprocess_over_served_tokens_per_s"]) == {"tiny_medical",
                                                                         "tiny_arithmetic"}
    for server in ("vllm", "vllm_plugin"):  # a first start and a second on the kept cache
        assert headline[f"{server}_startup_s"] > 0 and headline[f"{server}_restart_s"] > 0
        # One run's whole wall, served against lm-eval's in-process engine in a spawned process
        # (spawn to exit: a child that did not end would hang the bench, not get here).
        assert headline[f"{server}_wall_s"] > headline[f"{server}_startup_s"]
        assert headline[f"{server}_inprocess_wall_s"] > headline[
            f"{server}_inprocess_startup_s"] > 0
        assert headline[f"{server}_served_over_inprocess_wall"] > 0
    # The in-process engine was built, and ran the plugin's class.
    log = (tmp_path / "bench" / "vllm-plugin-inprocess.log").read_text()
    assert "Initializing a V1 LLM engine" in log and "HydraLoraLlamaForCausalLM" in log
    assert headline["runs"] == 1 and headline["one_server_startup_s"] > 0
    assert len(headline["server_per_run_scoring_s"]) == 1
    assert (tmp_path / "bench" / "vllm_server" / "vllm_server.log").is_file()
