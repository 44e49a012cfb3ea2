"""The lm-eval front: build the lm-eval model and tasks, call `simple_evaluate`, normalise results.

hydrabench never scores anything itself: metrics, filters and stderr all come from lm-eval.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from hydrabench.atomic import atomic_path, write_text_atomic
from hydrabench.config.includes import included
from hydrabench.errors import SpecError
from hydrabench.paths import TASKS_DIR, offline_mode

# The headline metric of a task, in order of preference ("metric,filter" as lm-eval keys them).
PRIMARY_METRICS = ("acc,none", "exact_match,strict-match", "exact_match,strip",
                   "pass@1,create_test", "exact_match,get-answer", "exact_match,none",
                   "exact_match,flexible-extract")


def task_manager(offline: bool):
    """lm-eval's index of hydrabench's task folders and the included ones
    (hydrabench.config.includes).

    Offline, the YAML in tasks/offline reuse the built-in task names over local files, so the
    built-in tasks (which would download) are left out to avoid the name clash.
    """
    return _task_manager(tuple(task_manager_paths(offline)), include_defaults=not offline)


@cache  # built once per set of folders: indexing lm-eval's task files costs seconds
def _task_manager(paths: tuple[Path, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    with _overrides_reported() as overrides:
        manager = TaskManager(include_path=[str(p) for p in paths],
                              include_defaults=include_defaults)
    if overrides:
        raise _clash(*overrides[0])
    return manager


class _Overrides(logging.Filter):
    """lm-eval's index warns, and goes on, when a later folder defines a name an earlier one
    did (its own tasks come first): (name, the later definition, the earlier one) of each, the
    warning held back (hydrabench refuses the clash in its own line)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, Path | None, Path | None]] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "overrides existing task" in str(record.msg) and len(record.args or ()) == 3:
            self.found.append(record.args)  # type: ignore[arg-type]
            return False
        return True


@contextmanager
def _overrides_reported() -> Iterator[list[tuple[str, Path | None, Path | None]]]:
    """The names lm-eval's index lets one task folder take from another while it is built
    (heard at WARNING whatever the level set, then the level put back)."""
    index_log = logging.getLogger("lm_eval.tasks._index")
    overrides, level = _Overrides(), index_log.level
    index_log.addFilter(overrides)
    index_log.setLevel(min(index_log.getEffectiveLevel(), logging.WARNING))
    try:
        yield overrides.found
    finally:
        index_log.removeFilter(overrides)
        index_log.setLevel(level)


def _clash(name: str, mine: Path | None, theirs: Path | None) -> SpecError:
    """An included task named like one of lm-eval's own (arc_easy), which lm-eval would
    silently replace: refused as a clash with a shipped task is (hydrabench.config.includes)."""
    return SpecError(f"{mine or 'a tag of an included task folder'}: {name} is already defined "
                     f"by {theirs or 'lm-eval'}: give yours another name")


def task_manager_paths(offline: bool) -> list[Path]:
    """The task folders lm-eval indexes: the synthetic suite's, offline the local copies'
    configs, and the user's own (--include-path, a profile's include_path)."""
    return [TASKS_DIR / "tiny", *([TASKS_DIR / "offline"] if offline else []),
            *(folder.root for folder in included())]


def check_tasks(tasks: list[str], allow_code_execution: bool = False) -> None:
    """Fail before any work when lm-eval does not know a task, or it runs code without opt-in."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from hydrabench.errors import SpecError, did_you_mean

    manager = task_manager(offline_mode())
    for task in tasks:
        if task not in manager.all_tasks:
            if problem := unreadable_task_file(task):
                raise SpecError(problem)
            raise did_you_mean("lm-eval task", task, list(manager.all_tasks))
        entry = manager.task_index[task]
        config = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else {}
        if not config.get("unsafe_code"):
            continue
        if not allow_code_execution:
            raise SpecError(f"task {task} executes model-written code; opt in with "
                            f"--allow-code-execution (it runs in hydrabench's sandbox)")
        from hydrabench.evaluation.sandbox import unavailable_reason

        if reason := unavailable_reason():  # found now, not after the generations
            raise SpecError(f"task {task}: {reason}")


def unreadable_task_file(task: str) -> str | None:
    """A task file of hydrabench's task folders defining `task` that lm-eval could not read (its
    index skips such a file silently, so the task looks unknown): what is wrong, naming it."""
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    defines = re.compile(rf"^task:\s*{re.escape(task)}\s*$", re.MULTILINE)
    for root in task_manager_paths(offline_mode()):
        for path in sorted(root.rglob("*.yaml")):
            if not path.is_file() or not defines.search(path.read_text(errors="replace")):
                continue
            try:
                load_yaml(path, resolve_func=False)
            except yaml.MarkedYAMLError as err:
                where = f"{path}:{err.problem_mark.line + 1}" if err.problem_mark else path
                return f"lm-eval task {task}: malformed YAML at {where}: {err.problem}"
            except Exception as err:  # an include that is missing or malformed, a bad tag
                return f"lm-eval task {task}: {path} cannot be read: {err}"
    return None


def check_task_configs(tasks: list[str]) -> None:
    """Build each task as lm-eval will and format its first document: a task YAML that names a
    missing function or holds a broken template is one line now, not after training."""
    from hydrabench.errors import SpecError

    quiet_lm_eval()
    manager = task_manager(offline_mode())
    for name in tasks:
        try:
            for task in manager.load([name])["tasks"].values():
                doc = next(iter(task.eval_docs))
                task.doc_to_text(doc)
                task.doc_to_target(doc)
                if task.OUTPUT_TYPE == "multiple_choice":
                    task.doc_to_choice(doc)
        except Exception as err:  # whatever lm-eval raises on a config it cannot use
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise SpecError(f"lm-eval task {name} cannot be built from its YAML "
                            f"({manager.task_index[name].yaml_path}): {type(err).__name__}: "
                            f"{first}") from None


# lm-eval's names for the generation budget, in the order it reads them, and its models' default.
MAX_GEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
DEFAULT_MAX_GEN_TOKS = 256


def _leaf_configs(manager: Any, name: str) -> Iterator[dict[str, Any]]:
    """The configs of the tasks `name` runs (itself, or a group's or tag's tasks), as lm-eval
    reads them from their YAML (includes merged), without loading any data."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[name]
    if entry.kind == Kind.TAG:
        for other in list(manager.task_index.values()):
            if name in other.tags:
                yield from _leaf_configs(manager, other.name)
        return
    config = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else (
        entry.cfg or {})
    if entry.kind != Kind.GROUP:
        yield config
        return
    for item in config.get("task", []):
        child = item.get("task") if isinstance(item, dict) else item
        if isinstance(child, str) and child in manager.task_index:
            yield from _leaf_configs(manager, child)


def uncached_hub_datasets(tasks: list[str]) -> dict[str, str]:
    """Per task of `tasks` (a group: per its tasks) that reads a dataset from the Hugging Face
    hub which this machine has not cached: that dataset, the first such (from the configs,
    without loading any data)."""
    manager = task_manager(offline_mode())
    missing: dict[str, str] = {}
    for name in tasks:
        for config in _leaf_configs(manager, name):
            dataset = _hub_dataset(config)
            if dataset is not None and not dataset_cached(dataset):
                missing.setdefault(name, dataset)
    return missing


def _hub_dataset(config: dict[str, Any]) -> str | None:
    """The hub dataset a task config loads; None where it reads local data (its own
    custom_dataset, a local folder, or a packaged builder such as json over its data_files)."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    path = config.get("dataset_path")
    if (config.get("custom_dataset") or not isinstance(path, str)
            or path in _PACKAGED_DATASETS_MODULES or Path(path).exists()):
        return None
    return path


def dataset_cached(path: str) -> bool:
    """Whether `datasets` finds the hub dataset `path` here without the hub: prepared in its
    cache (where it looks offline: its CachedDatasetModuleFactory), or downloaded to the hub's
    cache."""
    from datasets import config
    from datasets.naming import camelcase_to_snakecase
    from huggingface_hub import constants

    *namespace, name = path.split("/")
    prepared = Path(config.HF_DATASETS_CACHE).expanduser() / "___".join(
        [*namespace, camelcase_to_snakecase(name)])
    downloaded = Path(constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}"
    return downloaded.is_dir() or any(p.is_dir() for p in prepared.glob("*/*/*"))


def check_generation_lengths(tasks: list[str], context: int, gen_kwargs: str | None) -> None:
    """Each generation task's token budget (its generation_kwargs under `gen_kwargs`) leaves room
    for a prompt in the model's `context`; lm-eval would stop on it only after the other tasks."""
    from lm_eval.utils import simple_parse_args_string

    from hydrabench.errors import SpecError

    overrides = simple_parse_args_string(gen_kwargs)
    manager = task_manager(offline_mode())
    for task in tasks:
        for config in _leaf_configs(manager, task):
            if config.get("output_type") != "generate_until":
                continue
            merged = {**(config.get("generation_kwargs") or {}), **overrides}
            budget = next((merged[k] for k in MAX_GEN_KEYS if k in merged), DEFAULT_MAX_GEN_TOKS)
            if isinstance(budget, int) and budget >= context:
                raise SpecError(
                    f"task {config.get('task', task)} generates up to {budget} tokens, but the "
                    f"model's context is {context} tokens; lower it with --gen-kwargs "
                    f"max_gen_toks=N (N < {context})")


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


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _scores(results: dict[str, Any]) -> dict[str, TaskScore]:
    scores = {}
    for task, row in results["results"].items():
        # Records hold finite numbers only (a record with NaN is refused as corrupt): lm-eval's
        # NaN (its nanmean of nothing, a stderr of one item) is "not measured".
        metrics = {k: v for k, v in row.items()
                   if "," in k and "_stderr" not in k and _finite(v)}
        if not metrics:  # a group row without aggregate metrics
            continue
        stderr = {k: (row.get(k.replace(",", "_stderr,", 1))
                      if _finite(row.get(k.replace(",", "_stderr,", 1))) else None)
                  for k in metrics}
        primary = next((m for m in PRIMARY_METRICS if m in metrics), sorted(metrics)[0])
        n = results.get("n-samples", {}).get(task, {}).get("effective", 0)
        scores[task] = TaskScore(task, metrics, stderr, primary, n,
                                 results.get("n-shot", {}).get(task),
                                 results.get("versions", {}).get(task))
    return scores


# lm-eval's warnings that say nothing to a hydrabench user, by the logger that gives them:
# hydrabench hands HFLM a model object on purpose, and its tasks take no custom --metadata.
KNOWN_NOISE = {
    "lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type `str`",
                                   "Passed an already-initialized model through `pretrained`"),
    "lm_eval.api.task": ("Custom kwargs can be passed to `--metadata`",),
}


class _DropKnownNoise(logging.Filter):
    def __init__(self, messages: tuple[str, ...]) -> None:
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self.messages)


# HFLM warns once per request it truncates to the model's context (five-shot prompts on a small
# context: tens of thousands of lines). The first of each evaluation says it happens; the rest
# would bury the log.
TRUNCATION = "exceeds model's maximum length"


class _FirstTruncationOnly(logging.Filter):
    """Lets the first truncation warning through; `seen` is cleared as each evaluation starts."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if TRUNCATION not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg, record.args = (f"{record.getMessage()} (said once per evaluation: later "
                                   "requests over the context are truncated the same way)"), None
        return True


TRUNCATION_SAID = _FirstTruncationOnly()


@cache
def quiet_lm_eval() -> None:
    """Filter lm-eval's known noise (once per process, before lm-eval is called)."""
    import lm_eval.evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    for name, messages in KNOWN_NOISE.items():
        logging.getLogger(name).addFilter(_DropKnownNoise(messages))
    logging.getLogger("lm_eval.models.huggingface").addFilter(TRUNCATION_SAID)
    # lm-eval records the commit of the working directory by running `git describe`, whose
    # "fatal: not a git repository" reaches the terminal outside a repository; its own fallback
    # reads .git without git and says nothing (hydrabench's records carry their own commit).
    lm_eval.evaluator.get_git_commit_hash = lambda: get_commit_from_path(os.getcwd())


def evaluate_model(model: torch.nn.Module, tokenizer, tasks: list[str], *, batch_size: int,
                   limit: int | None, seed: int, allow_code_execution: bool = False,
                   num_fewshot: int | None = None, max_length: int | None = None,
                   output_dir: Path | None = None,
                   gen_kwargs: str | None = None) -> dict[str, TaskScore]:
    """Score an in-memory model with lm-eval's HF backend; raw output saved under output_dir."""
    from lm_eval.models.huggingface import HFLM

    quiet_lm_eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    return run_lm_eval(lm, tasks, batch_size=batch_size, limit=limit, seed=seed,
                       allow_code_execution=allow_code_execution, num_fewshot=num_fewshot,
                       output_dir=output_dir, gen_kwargs=gen_kwargs)


def run_lm_eval(model: Any, tasks: list[str], *, batch_size: int | None, limit: int | None,
                seed: int, allow_code_execution: bool, num_fewshot: int | None,
                output_dir: Path | None, manager: Any = None,
                gen_kwargs: str | None = None) -> dict[str, TaskScore]:
    """`simple_evaluate` on an lm-eval model instance, with hydrabench's task manager unless
    another (e.g. one with task metadata) is given."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    quiet_lm_eval()
    TRUNCATION_SAID.seen = False
    if allow_code_execution:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # what lm-eval's code tasks require
    results = lm_eval.simple_evaluate(
        model=model, batch_size=batch_size, tasks=tasks,
        num_fewshot=num_fewshot, limit=limit, log_samples=True,
        task_manager=manager or task_manager(offline_mode()),
        confirm_run_unsafe_code=allow_code_execution,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, bootstrap_iters=1000, gen_kwargs=gen_kwargs)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        samples = results.pop("samples", {})
        # Atomic writes: a full disk is one line naming the file.
        write_text_atomic(output_dir / "lm_eval_results.json",
                          json.dumps(results, indent=1, default=handle_non_serializable))
        for task, rows in samples.items():
            with atomic_path(output_dir / f"{SAMPLES_PREFIX}{task}.jsonl") as tmp, \
                    open(tmp, "w") as fh:
                for row in rows:
                    fh.write(json.dumps(row, default=handle_non_serializable) + "\n")
    return _scores(results)


SAMPLES_PREFIX = "samples_"


def read_samples(output_dir: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(lm-eval task, row) for every per-sample row `run_lm_eval` wrote to output_dir.

    A row is one document under one filter: doc_id, doc, doc_hash, arguments (the requests),
    resps, filter, and the document's value of each metric (e.g. "acc": 1.0).
    """
    for samples in sorted(output_dir.glob(f"{SAMPLES_PREFIX}*.jsonl")):
        task = samples.stem.removeprefix(SAMPLES_PREFIX)
        for line in samples.read_text().splitlines():
            yield task, json.loads(line)


def request_counts(output_dir: Path, tokenizer) -> dict[str, int]:
    """Requests, prompt tokens and generated tokens of an evaluation, from lm-eval's samples."""
    counts = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0}
    prompt_tokens: dict[str, int] = {}  # multiple-choice requests repeat their context per choice
    for _, row in read_samples(output_dir):
        for arguments, response in zip(row["arguments"], row["resps"], strict=False):
            counts["requests"] += 1
            context = arguments[0]
            if context not in prompt_tokens:
                prompt_tokens[context] = len(tokenizer(context)["input_ids"])
            counts["prompt_tokens"] += prompt_tokens[context]
            if isinstance(response[0], str):  # generate_until; loglikelihood gives numbers
                counts["generated_tokens"] += len(
                    tokenizer(response[0], add_special_tokens=False)["input_ids"])
    return counts
