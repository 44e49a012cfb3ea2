"""The lm-eval front: build the lm-eval model and tasks, call `simple_evaluate`, normalise results.

hydrabench never scores anything itself: metrics, filters and stderr all come from lm-eval.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

TASKS_DIR = Path(os.environ.get("HYDRABENCH_TASKS_DIR",
                                Path(__file__).resolve().parents[1] / "tasks"))

# The headline metric of a task, in order of preference ("metric,filter" as lm-eval keys them).
PRIMARY_METRICS = ("acc,none", "exact_match,strict-match", "exact_match,strip", "pass@1,none",
                   "exact_match,get-answer", "exact_match,none", "exact_match,flexible-extract")


def offline_mode() -> bool:
    """Offline when local benchmark copies are configured or the hub is switched off."""
    return bool(os.environ.get("HYDRABENCH_DATA_DIR")) or os.environ.get("HF_HUB_OFFLINE") == "1"


@cache
def task_manager(offline: bool):
    """Built once per process: indexing lm-eval's task files costs seconds.

    Offline, the YAML in tasks/offline reuse the built-in task names over local files, so the
    built-in tasks (which would download) are left out to avoid the name clash.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR / "tiny")]
    if offline:
        paths.append(str(TASKS_DIR / "offline"))
    return TaskManager(include_path=paths, include_defaults=not offline)


def check_tasks(tasks: list[str]) -> None:
    """Fail before any work when lm-eval does not know a task name."""
    manager = task_manager(offline_mode())
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        from hydrabench.spec import did_you_mean

        raise did_you_mean("lm-eval task", unknown[0], list(manager.all_tasks))


@dataclass
class TaskScore:
    task: str
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    primary: str
    n_samples: int
    n_shot: int | None
    version: Any

    @property
    def value(self) -> float:
        return self.metrics[self.primary]

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "stderr": self.stderr, "primary": self.primary,
                "value": self.value, "n": self.n_samples, "n_shot": self.n_shot,
                "version": self.version}


def _scores(results: dict[str, Any]) -> dict[str, TaskScore]:
    scores = {}
    for task, row in results["results"].items():
        metrics = {k: v for k, v in row.items()
                   if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
        if not metrics:  # a group row without aggregate metrics
            continue
        stderr = {k: (row.get(k.replace(",", "_stderr,", 1))
                      if isinstance(row.get(k.replace(",", "_stderr,", 1)), (int, float))
                      else None) for k in metrics}
        primary = next((m for m in PRIMARY_METRICS if m in metrics), sorted(metrics)[0])
        n = results.get("n-samples", {}).get(task, {}).get("effective", 0)
        scores[task] = TaskScore(task, metrics, stderr, primary, n,
                                 results.get("n-shot", {}).get(task),
                                 results.get("versions", {}).get(task))
    return scores


def evaluate_model(model: torch.nn.Module, tokenizer, tasks: list[str], *, batch_size: int,
                   limit: int | None, seed: int, allow_code_execution: bool = False,
                   num_fewshot: int | None = None, max_length: int | None = None,
                   output_dir: Path | None = None) -> dict[str, TaskScore]:
    """Score an in-memory model with lm-eval's HF backend; raw output saved under output_dir."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    if allow_code_execution:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # what lm-eval's code tasks require
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, log_samples=True,
        task_manager=task_manager(offline_mode()), confirm_run_unsafe_code=allow_code_execution,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, bootstrap_iters=1000)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        samples = results.pop("samples", {})
        (output_dir / "lm_eval_results.json").write_text(
            json.dumps(results, indent=1, default=handle_non_serializable))
        for task, rows in samples.items():
            with open(output_dir / f"samples_{task}.jsonl", "w") as fh:
                for row in rows:
                    fh.write(json.dumps(row, default=handle_non_serializable) + "\n")
    return _scores(results)


def column_score(scores: dict[str, TaskScore], tasks: list[str]) -> float:
    """A table column's value: the mean of its tasks' primary metrics (one task: that metric)."""
    return sum(scores[t].value for t in tasks) / len(tasks)
