"""Training is never lost to serving, and a run frees its model.

A run served by vLLM asks a child process whether vLLM imports before any work (`backend: auto`
takes hf where it does not, and the plan says why); a vLLM engine that fails after training keeps
the trained artifact and writes no record, so the rerun trains nothing; `execute` leaves none of
its models behind. The one real-engine test gives vLLM a context longer than the model's, which
hydrabench's own checks let through and the engine refuses at start-up.
"""

from __future__ import annotations

import gc
import json
import re
import shutil
import subprocess
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import artifact_info, assert_refused_in_one_line, error_lines

from hydrabench.cli import main
from hydrabench.errors import SpecError
from hydrabench.pipeline import resolve
from hydrabench.pipeline import run as runner
from hydrabench.pipeline.resolve import auto_fallback, resolve_spec, vllm_import_error
from hydrabench.pipeline.run import (
    describe,
    execute,
    free_memory,
    kept_if_serving_fails,
    plan_run,
    shared_server_share,
)
from hydrabench.records.store import ARTIFACT_INFO, RunStore
from hydrabench.serving.server import ServerError

STORIES = str(Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K")
QUICK = ["--method", "lora", "--task", "medical", "--max-steps", "2", "--limit", "2"]
# An import that fails in the child the way a missing vLLM does (the real vLLM is installed here).
MISSING = "import hydrabench_no_such_module"


@pytest.fixture
def vllm_import(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """What the child imports may be replaced by the test; the per-process answer is asked
    afresh in the test and forgotten after it (other tests ask about the real vLLM)."""
    vllm_import_error.cache_clear()
    yield monkeypatch
    vllm_import_error.cache_clear()


def test_vllm_import_is_asked_of_a_child_once_per_process(
        vllm_import: pytest.MonkeyPatch) -> None:
    """The child's import succeeds: None; fails: its last error line. Each asked once."""
    calls = []
    real_run = subprocess.run

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real_run(*args, **kwargs)

    vllm_import.setattr(resolve.subprocess, "run", counted)
    vllm_import.setattr(resolve, "VLLM_IMPORT", "import json")
    assert vllm_import_error() is None and vllm_import_error() is None
    assert len(calls) == 1 and calls[0][-1] == "import json"
    vllm_import_error.cache_clear()
    vllm_import.setattr(resolve, "VLLM_IMPORT", MISSING)
    error = vllm_import_error()
    assert error == "ModuleNotFoundError: No module named 'hydrabench_no_such_module'"
    assert vllm_import_error() == error and len(calls) == 2


def test_vllm_that_does_not_import_is_one_line_before_any_work(
        vllm_import: pytest.MonkeyPatch, store_env: Path, capsys: pytest.CaptureFixture) -> None:
    """`--backend vllm` where vLLM does not import: exit 2, one line, no model loaded, nothing
    under results/ (before, the run trained and then failed to serve)."""
    vllm_import.setattr(resolve, "VLLM_IMPORT", MISSING)

    def no_load(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    vllm_import.setattr(runner, "load_base_or_export", no_load)
    assert_refused_in_one_line(["run", *QUICK, "--backend", "vllm"],
                               "backend vllm, but vLLM does not import here (ModuleNotFoundError",
                               store_env / "results", capsys)


def test_backend_auto_takes_hf_where_vllm_does_not_import_and_the_plan_says_why(
        vllm_import: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The tiny model (head size 32, which vLLM's CPU build serves): vllm where vLLM imports,
    hf where it does not, and the run's plan names the reason (nothing written to plan it)."""
    auto = {"eval": {"backend": "auto"}}
    vllm_import.setattr(resolve, "VLLM_IMPORT", "import json")
    served = resolve_spec("lora", "medical", overrides=auto)
    assert served.eval.backend == "vllm" and auto_fallback(served) is None
    vllm_import_error.cache_clear()
    vllm_import.setattr(resolve, "VLLM_IMPORT", MISSING)
    spec = resolve_spec("lora", "medical", overrides=auto)
    assert spec.eval.backend == "hf"
    assert auto_fallback(spec) == ("vLLM does not import here: ModuleNotFoundError: No module "
                                   "named 'hydrabench_no_such_module'")
    store = RunStore(tmp_path / "results")
    plan = describe(plan_run(spec, store), store)
    assert "(hf, as backend auto: vLLM does not import here: ModuleNotFoundError" in plan
    assert not (tmp_path / "results").exists()


def test_backend_auto_names_a_head_size_vllms_cpu_build_cannot_serve() -> None:
    """stories260K's head size 8, with no GPU here: hf, and why (vLLM is not asked)."""
    if torch.cuda.is_available():
        pytest.skip("the CPU build's head sizes matter only without a GPU")
    spec = resolve_spec("lora", "medical", model=STORIES, overrides={"eval": {"backend": "auto"}})
    assert spec.eval.backend == "hf"
    assert auto_fallback(spec) == f"vLLM's CPU build cannot serve head size 8 ({STORIES})"


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


@pytest.mark.parametrize("trained", [True, False])
def test_serving_failure_keeps_the_artifact_it_trained_and_nothing_else(
        trained: bool, tmp_path: Path) -> None:
    """A ServerError inside the run's block: the artifact this call trained stays (whole, with
    its ARTIFACT_INFO); its lock files, and the folders it made that are empty, go."""
    spec = resolve_spec("lora", "medical")
    store = RunStore(tmp_path / "results")
    with (pytest.raises(ServerError, match="engine exited"),
          kept_if_serving_fails(spec, store), store.lock(spec.run_id)):
        if trained:
            with (store.lock(f"train-{spec.train_id}"),
                  store.staging(store.artifact_dir(spec.train_id)) as scratch):
                (scratch / ARTIFACT_INFO).write_text('{"trained": true}')
        store.runs.mkdir(parents=True)  # as the run's staging makes it
        raise ServerError("vLLM engine exited with status 1")
    if trained:
        assert tree(store.root) == {"artifacts", f"artifacts/{spec.train_id}",
                                    f"artifacts/{spec.train_id}/{ARTIFACT_INFO}"}
        assert store.artifact_info(spec.train_id) == {"trained": True}
    else:
        assert not store.root.exists()


def test_a_run_that_used_cuda_empties_the_allocators_cache(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA faked (none exists here): the cache is emptied only where CUDA was initialised."""
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    free_memory()
    assert emptied == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    free_memory()
    assert emptied == [True]


def watch_models(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref]:
    """Weak references to every base model the runner loads (those training adapts in place,
    hence the peft model around them, and the fresh ones it scores)."""
    refs: list[weakref.ref] = []
    real_load = runner.load_base_or_export

    def watched(*args, **kwargs):
        base = real_load(*args, **kwargs)
        refs.append(weakref.ref(base.model))
        return base

    monkeypatch.setattr(runner, "load_base_or_export", watched)
    return refs


def test_a_failed_run_leaves_no_model_to_the_caller(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A run refused after its base model loaded (a target module the model lacks): while the
    caller handles the error (a sweep goes on to its next run), the model is already gone, not
    held by the traceback's frames."""
    spec = resolve_spec("lora", "medical", overrides={"adapter": {"target_modules": ["nope"]}})
    refs = watch_models(monkeypatch)
    try:
        execute(spec, store=RunStore(tmp_path / "results"))
    except SpecError as err:
        assert "target module(s) nope not in model" in str(err)
        assert len(refs) == 1 and refs[0]() is None
    else:
        raise AssertionError("the run was not refused")


@pytest.mark.slow
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                        reason="no CUDA here"))])
def test_execute_leaves_no_model_behind(device: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny LoRA run trained and scored (hf): once `execute` returns, none of the models it
    loaded is alive, with the cyclic collector off (it must not take a collection that may come
    late); on CUDA, the allocator holds, and keeps in its cache, what it did before."""
    profile = tmp_path / "mine.yaml"
    profile.write_text(f"extends: tiny\ndevice: {device}\n")
    spec = resolve_spec("lora", "medical", str(profile),
                        overrides={"train": {"max_steps": 2}, "eval": {"limit": 2}})
    refs = watch_models(monkeypatch)
    cuda = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()) if device == "cuda" \
        else None
    gc.disable()
    try:
        record = execute(spec, store=RunStore(tmp_path / "results"))
    finally:
        gc.enable()
    assert record is not None and record.training.trained
    assert len(refs) == 2 and [ref() for ref in refs] == [None, None]
    if cuda is not None:
        assert torch.cuda.memory_allocated() == cuda[0]
        assert torch.cuda.memory_reserved() <= cuda[1]  # its cache given back


@pytest.mark.slow
def test_engine_failing_after_training_keeps_the_artifact_and_the_rerun_trains_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A real vLLM engine given a context longer than the model's, which vLLM refuses at
    start-up, after the run trained: exit 2, one line, the artifact kept, no record, no model
    left alive. The rerun (backend hf) scores that artifact and trains nothing. hydrabench now
    refuses that setting before training (check_vllm_settings): switched off here so that the
    real engine stands for a failure no check foresees."""
    results = tmp_path / "results"
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(results))
    monkeypatch.setattr(runner, "check_vllm_settings", lambda spec: None)
    profile = tmp_path / "mine.yaml"
    profile.write_text("extends: tiny\neval: {max_model_len: 4096}\n")
    refs = watch_models(monkeypatch)
    assert main(["run", *QUICK, "--profile", str(profile), "--backend", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "training lora" in err  # it trained before the engine failed
    (error,) = error_lines(err)
    assert "vLLM engine" in error and "max_model_len" in error, error
    log = Path(re.search(r"engine log: (\S+)\)$", error).group(1))
    assert not log.is_relative_to(results)
    shutil.rmtree(log.parent)
    info = artifact_info(results)
    assert info["trained"] and info["train"]["steps"] == 2
    assert "the trained artifact stays in" in err
    assert not list(results.glob("runs/*/record.json")) and not list(results.glob(".locks/*"))
    assert refs and all(ref() is None for ref in refs)

    assert main(["run", *QUICK, "--profile", str(profile), "--backend", "hf"]) == 0
    err = capsys.readouterr().err
    assert "trained artifact found" in err and "training lora" not in err
    (path,) = results.glob("runs/*/record.json")
    record = json.loads(path.read_text())
    assert artifact_info(results) == info  # the same artifact, not trained again
    assert record["training"]["train"]["steps"] == 2
    assert results / record["artifact"] == next(results.glob("artifacts/*/artifact.json")).parent


# -- a shared server leaves room for each run's own model (no CUDA here: sizes given directly) ---

def test_a_shared_server_leaves_room_for_a_runs_own_model() -> None:
    gib = 2**30
    # LLaMA-2-7B in bf16 (13.5 GiB) on an 80 GiB H100: vLLM's 0.9 would leave 8 GiB.
    share = shared_server_share(int(13.5 * gib), 80 * gib, None)
    assert share == round(1 - (1.25 * 13.5 + 2) / 80, 2) == 0.76
    assert (1 - share) * 80 >= 13.5  # the run's copy fits beside the server
    assert shared_server_share(int(0.5 * gib), 80 * gib, None) == 0.9  # small: vLLM's default
    assert shared_server_share(int(13.5 * gib), 80 * gib, 0.5) == 0.5  # asked for: it stands


def test_a_shared_server_that_cannot_fit_beside_a_run_is_one_line() -> None:
    with pytest.raises(SpecError, match=r"do not both fit in the GPU's 16 GiB: use "
                                        r"eval.serving: merged"):
        shared_server_share(int(13.5 * 2**30), 16 * 2**30, None)
