"""Resolution: a profile plus the user's overrides become one RunSpec. It reads the method
registry (a method's adapter defaults, backend `auto`) and fingerprints the inputs, so it sits
above methods, export and provenance; it imports them where it needs them, which keeps the
modules that only resolve table specs (tables, reports) free of torch."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hydrabench.errors import did_you_mean, require
from hydrabench.includes import include
from hydrabench.paths import data_dir
from hydrabench.profiles import TaskColumn, load_profile, load_sharding
from hydrabench.spec import (
    AdapterSettings,
    EvalSettings,
    InputFingerprints,
    RunSpec,
    TrainSettings,
    parse_settings,
)

# `eval --task lm-eval:bbh` names lm-eval's task where a profile column has the same name.
LM_EVAL_PREFIX = "lm-eval:"


def resolve_spec(method: str, task: str, profile: str = "tiny", seed: int | None = None,
                 model: str | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                 lm_eval_task_ok: bool = False,
                 trust_remote_code: bool = False) -> RunSpec:
    """Profile YAML + CLI overrides ({"train": {...}, "adapter": {...}, "eval": {...}}).

    `task` is a column of the profile; with `lm_eval_task_ok` any other name is taken as one
    lm-eval task (checked against lm-eval's registry before the run starts).
    """
    prof = load_profile(profile)
    include(prof.include_path, f"profile {profile}: include_path")  # its tasks, for fingerprints
    seed = prof.seed if seed is None else seed  # a profile may name its recipe's seed
    require(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32,
            f"seed must be an integer in [0, 2**32), got {seed!r}")
    from hydrabench.methods import METHODS, get_method

    registered = get_method(method)  # the one check of a method's name
    tasks = dict(prof.tasks)
    if lm_eval_task_ok and task.startswith(LM_EVAL_PREFIX):  # the lm-eval task, not a column
        task = task.removeprefix(LM_EVAL_PREFIX)
        tasks[task] = TaskColumn(corpus="none", eval=(task,))
    if task not in tasks and lm_eval_task_ok:
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
    require(not eval_settings.merge_gap or bool(registered.approximate_merges),
            f"--merge-gap scores a method's approximate merges, and {method} has none (it "
            f"{'merges exactly' if registered.mergeable else 'cannot be merged'}); methods that "
            f"have some: {', '.join(m.name for m in METHODS.values() if m.approximate_merges)}")
    model = model or prof.model
    if eval_settings.backend == "auto":  # decided here, so the run id names the real backend
        from hydrabench.export import auto_backend

        targets = parse_settings(AdapterSettings, section["adapter"], "adapter").target_modules
        eval_settings = replace(eval_settings, backend=auto_backend(
            method, model, targets, eval_settings.tensor_parallel_size))
    if section["eval"].get("backend") == "auto" and eval_settings.backend == "vllm" and (
            not _vllm_serves_here(model)):
        eval_settings = replace(eval_settings, backend="hf")
    corpus = corpus or tasks[task].corpus
    eval_tasks = tasks[task].eval
    return RunSpec(
        method=method, task=task, profile=profile, model=model, seed=seed, corpus=corpus,
        eval_tasks=eval_tasks, inputs=fingerprint_inputs(model, corpus, eval_tasks),
        device=prof.device, dtype=prof.dtype, prompt_template=prof.prompt_template,
        country_iso_code=prof.country_iso_code,
        trust_remote_code=trust_remote_code or prof.trust_remote_code,
        train=parse_settings(TrainSettings, section["train"], "train"),
        adapter=parse_settings(AdapterSettings, section["adapter"], "adapter"),
        eval=eval_settings,
    )


# Head sizes the attention of vLLM's CPU build accepts (measured: ../shared/notes/vllm-cpu.md).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _vllm_serves_here(model: str) -> bool:
    """False where vLLM's CPU build (no GPU here) cannot serve the model's head size; True where
    it can, on a GPU, or where the model's config cannot be read here (a hub id not downloaded)."""
    import torch
    from transformers import AutoConfig

    from hydrabench.models import resolve_model_dir

    directory = resolve_model_dir(model)
    if torch.cuda.is_available() or directory is None:
        return True
    try:
        config = AutoConfig.from_pretrained(str(directory))
        head_size = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads)
    except (OSError, ValueError, AttributeError):
        return True
    return head_size in VLLM_CPU_HEAD_SIZES


def fingerprint_inputs(model: str, corpus: str, eval_tasks: tuple[str, ...]) -> InputFingerprints:
    from hydrabench import provenance

    return InputFingerprints(model=provenance.model_fingerprint(model),
                             corpus=provenance.corpus_fingerprints(corpus),
                             tasks=provenance.task_fingerprints(eval_tasks))


def retarget(trained: RunSpec, task: str, eval_overrides: dict[str, Any]) -> RunSpec:
    """The same training (hence the same artifact) scored on another column or lm-eval task."""
    column = resolve_spec(trained.method, task, trained.profile, trained.seed,
                          lm_eval_task_ok=True)
    return replace(trained, task=column.task, eval_tasks=column.eval_tasks,
                   inputs=replace(trained.inputs, tasks=column.inputs.tasks),
                   eval=replace(trained.eval, **eval_overrides))
