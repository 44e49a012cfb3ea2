"""The `paper` profile's wiring on this CPU: its corpora, prompt template, hyper-parameters and
benchmarks, run end to end on the real tiny stories260K model with local data (a GPU runs it for
real; nothing here needs one)."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SHARED, assert_refused_in_one_line, child_env, finish, start

from hydrabench.config.profiles import load_profile
from hydrabench.errors import SpecError
from hydrabench.pipeline.resolve import resolve_spec
from hydrabench.pipeline.run import execute
from hydrabench.records.store import RunStore
from hydrabench.serving.export import _hub_architectures, auto_backend

MODEL = SHARED / "models" / "stories260K"
pytestmark = pytest.mark.skipif(not MODEL.is_dir(), reason="../shared/models not present")


def test_small_profile_extends_paper() -> None:
    paper, small = load_profile("paper"), load_profile("small")
    assert small.model == "Qwen/Qwen2.5-0.5B"
    assert small.train["batch_size"] * small.train["grad_accum"] == 8
    assert small.train["lr"] == paper.train["lr"] == 2e-4
    assert small.tasks == paper.tasks


def test_default_7b_needs_a_gpu(tmp_path) -> None:
    spec = resolve_spec("lora", "math", "paper")  # resolving (e.g. for reports) works anywhere
    assert spec.device == "auto"
    if not torch.cuda.is_available():
        with pytest.raises(SpecError, match="needs a GPU"):
            execute(spec, store=RunStore(tmp_path / "results"))
        assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("argv", [["run", "--method", "hydralora", "--task", "math"],
                                  ["eval", "--model", "meta-llama/Llama-2-7b-hf",
                                   "--task", "mmlu_anatomy"]])
def test_the_7b_on_a_cpu_is_refused_before_any_hub_access(
        argv: list[str], tmp_path, monkeypatch, capsys) -> None:
    """The GPU check comes first: backend auto reads the model's config to pick the plugin for
    HydraLoRA, which offline retries the hub for half a minute (any such read fails the test)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the profile runs here")
    from transformers import AutoConfig

    def read(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"read the config of {args[0]} before the GPU check")

    monkeypatch.setattr(AutoConfig, "from_pretrained", read)
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    assert_refused_in_one_line([*argv, "--profile", "paper"],
                               "profile paper needs a GPU for meta-llama/Llama-2-7b-hf",
                               tmp_path / "results", capsys)


@pytest.mark.slow
def test_a_report_of_the_paper_profile_waits_on_no_unreachable_hub(tmp_path) -> None:
    """Planning HydraLoRA's rows reads the 7B's config (backend auto: the plugin covers its
    architecture?). With the hub unreachable and not switched off (a closed port here, as a
    laptop without network), transformers retried each read for ~25 s: the report of an empty
    Table 1 took two minutes. It reads the hub cache alone then, and says nothing of retries."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    online = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in online}
    env = child_env(tmp_path / "results", base=env, HF_ENDPOINT=f"http://127.0.0.1:{port}",
                    HYDRABENCH_REPORTS=str(tmp_path / "reports"),
                    HF_HOME=str(tmp_path / "hf-home"))
    done = subprocess.run([sys.executable, "-m", "hydrabench.cli", "report", "table1",
                           "--profile", "paper"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Retrying" not in done.stderr, done.stderr[-2000:]
    assert (tmp_path / "reports" / "table1.md").is_file()


def test_the_hub_is_asked_once_per_model_in_a_process(monkeypatch) -> None:
    """Each of a paper report's HydraLoRA-family rows asks backend auto whether the plugin
    covers the 7B: one hub probe (up to 3 s where the network drops packets) per model, not per
    row. The probe is replaced by a counter (answering "unreachable": the hub cache alone)."""
    probes = []
    monkeypatch.setattr("hydrabench.paths.hub_reachable", lambda: probes.append(1) or False)
    _hub_architectures.cache_clear()
    targets = ("q_proj", "v_proj")
    backends = {auto_backend("hydralora", "meta-llama/Llama-2-7b-hf", targets, 1)
                for _ in range(4)}
    auto_backend("hydralora", "Qwen/Qwen2-7B", targets, 1)
    assert len(backends) == 1 and len(probes) == 2
    _hub_architectures.cache_clear()


def readme_paper_cpu_check() -> list[str]:
    """The arguments of the CPU check of the paper profile, as docs/profiles.md gives them."""
    command = re.search(r"`HYDRABENCH_DATA_DIR=\.\./shared/data hydrabench (run --profile paper "
                        r"[^`]+)`", (REPO / "docs" / "profiles.md").read_text()).group(1)
    return [str(SHARED / arg[10:]) if arg.startswith("../shared/") else arg
            for arg in command.split()]


@pytest.mark.slow
def test_paper_pipeline_runs_on_cpu_with_local_data(tmp_path, monkeypatch) -> None:
    """The README's command, as a process: backend auto serves mergeable methods with vLLM, and
    takes hf where vLLM cannot serve the model (stories260K's head size 8, on vLLM's CPU build)."""
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(SHARED / "data"))
    if not torch.cuda.is_available():
        for method in ("lora", "hydralora"):
            assert resolve_spec(method, "math", "paper", model=str(MODEL)).eval.backend == "hf"
    args = readme_paper_cpu_check()
    spec = resolve_spec("lora", "math", "paper", model=str(MODEL))
    assert spec.corpus == "data:gsm8k/train.jsonl" and spec.prompt_template == "reference"
    assert spec.dtype == "bfloat16" and spec.train.lr == 2e-4 and spec.adapter.alpha == 32
    finish(start(args, tmp_path / "results"))
    (path,) = (tmp_path / "results").glob("runs/*/record.json")
    record = json.loads(path.read_text())
    assert record["training"]["train"]["steps"] == 2
    assert record["metrics"]["gsm8k_cot"]["n"] == 5
    assert record["provenance"]["data_source"] == "local"
    assert "data:gsm8k/train.jsonl" in record["provenance"]["data_fingerprints"]
