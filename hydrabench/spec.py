"""RunSpec: everything that decides a run's result, resolved from a profile plus overrides.

The run id is a hash of the resolved spec, so identical requests find each other's records
(resume) and any change of a hyper-parameter gives a new run. The spec holds the content
fingerprints of what the run consumes (base model, corpus, task configs and data), so editing any
of them gives a new run too.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class SpecError(ValueError):
    """Bad user input: reported as one line, exit code 2, before anything is written."""


def did_you_mean(kind: str, name: str, valid: list[str]) -> SpecError:
    """One line: the nearest valid name and all of them where they are few; where they are many
    (lm-eval knows thousands of tasks), the three nearest."""
    if len(valid) <= 30:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return SpecError(f"unknown {kind} {name!r}{hint}; valid: {', '.join(sorted(valid))}")
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.0)
    return SpecError(f"unknown {kind} {name!r} (did you mean {', '.join(map(repr, close))}?; "
                     f"{len(valid)} known)")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SpecError(message)


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 2e-4
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    epochs: int = 1
    max_steps: int = 0  # 0: run the whole epochs
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 1024
    weight_decay: float = 0.0
    checkpoint_every: int = 100
    # FSDP2 options (from hydrabench/sharding/<name>.yaml, resolved with their name) used when
    # torchrun launches several processes; None: each process holds the whole model (DDP).
    sharding: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _require(self.scheduler in ("cosine", "linear", "constant"),
                 f"scheduler must be cosine, linear or constant, got {self.scheduler!r}")
        _require(0 <= self.warmup_ratio < 1,
                 f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _require(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _require(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        _require(self.seq_len >= 8, f"seq_len must be >= 8, got {self.seq_len}")
        _require(self.checkpoint_every >= 1,
                 f"checkpoint_every must be >= 1, got {self.checkpoint_every}")


@dataclass(frozen=True)
class AdapterSettings:
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    num_heads: int | str = 4  # an int, or "auto": TF-IDF + k-means + elbow, as the paper
    num_splits: int = 4
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    balance_loss_coef: float = 0.0  # HydraLoRA's load-balancing term; off, as the reference code
    # LoRAMoE's localized balancing constraint: its weight, its imbalance (delta) and the record
    # components of the world-knowledge type (its code's blc_weight, blc_alpha, task_type 1)
    blc_weight: float = 0.0
    blc_alpha: float = 0.0
    blc_knowledge: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        _require(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        _require(self.num_heads == "auto" or (isinstance(self.num_heads, int)
                                              and self.num_heads >= 1),
                 f"num_heads must be >= 1 or 'auto', got {self.num_heads!r}")
        _require(self.num_splits >= 1, f"num_splits must be >= 1, got {self.num_splits}")
        _require(len(self.target_modules) > 0, "target_modules must name at least one module")
        _require(self.balance_loss_coef >= 0,
                 f"balance_loss_coef must be >= 0, got {self.balance_loss_coef}")
        _require(self.blc_weight >= 0, f"blc_weight must be >= 0, got {self.blc_weight}")
        _require(0 <= self.blc_alpha <= 1, f"blc_alpha must be in [0, 1], got {self.blc_alpha}")


# hf: lm-eval's HF backend on the in-memory model; vllm: a merged checkpoint served by vLLM (for
# HydraLoRA-family methods the adapter, by hydrabench's plugin); auto (profiles only): vllm for
# the methods vLLM serves exactly on the model, hf for the others.
BACKENDS = ("hf", "vllm", "auto")


@dataclass(frozen=True)
class EvalSettings:
    backend: str = "hf"
    batch_size: int = 16
    limit: int | None = None
    num_fewshot: int | None = None  # None: each task's own default
    allow_code_execution: bool = False
    # HydraLoRA: also score the approximate merges (uniform, router-mean) and record the gap
    merge_gap: bool = False
    # vLLM serving (backend vllm): parallelism and memory, passed to the server as they are
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None  # None: the model's own context length
    # lm-eval's --gen_kwargs ("max_gen_toks=128,temperature=0"), over each generation task's own
    gen_kwargs: str | None = None

    def __post_init__(self) -> None:
        _require(self.backend in BACKENDS,
                 f"unknown backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        _require(self.batch_size >= 1, f"eval batch_size must be >= 1, got {self.batch_size}")
        _require(self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}")
        _require(self.num_fewshot is None or self.num_fewshot >= 0,
                 f"num_fewshot must be >= 0, got {self.num_fewshot}")
        _require(self.gen_kwargs is None or all(
            "=" in pair for pair in self.gen_kwargs.split(",") if pair),
                 f"gen_kwargs must be key=value pairs joined by commas (lm-eval's --gen_kwargs), "
                 f"got {self.gen_kwargs!r}")
        _require(self.tensor_parallel_size >= 1 and self.data_parallel_size >= 1,
                 "tensor_parallel_size and data_parallel_size must be >= 1")
        _require(self.gpu_memory_utilization is None or 0 < self.gpu_memory_utilization <= 1,
                 f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class InputFingerprints:
    """Content fingerprints (hydrabench.provenance) of the base model, of each corpus part, and of
    each lm-eval task's config and data: part of the run id, and of the train id but the tasks."""

    model: str
    corpus: dict[str, str]
    tasks: dict[str, dict[str, str]]


@dataclass(frozen=True)
class RunSpec:
    method: str
    task: str
    profile: str
    model: str
    seed: int
    corpus: str
    eval_tasks: tuple[str, ...]
    inputs: InputFingerprints
    device: str = "cpu"
    dtype: str = "float32"
    prompt_template: str = "plain"
    country_iso_code: str = "USA"
    trust_remote_code: bool = False  # never on unless the profile or --trust-remote-code says so
    train: TrainSettings = field(default_factory=TrainSettings)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _digest(self, payload: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def run_id(self) -> str:
        """Readable prefix plus a hash of the whole resolved spec."""
        return f"{self.method}-{self.task}-s{self.seed}-{self._digest(self.to_dict())}"

    @property
    def train_id(self) -> str:
        """Hash of what decides the trained weights only: columns sharing a corpus share it."""
        payload = self.to_dict()
        for key in ("task", "eval_tasks", "eval"):
            payload.pop(key)
        payload["inputs"].pop("tasks")
        return f"{self.method}-s{self.seed}-{self._digest(payload)}"


PROFILE_DIR = Path(str(resources.files("hydrabench") / "profiles"))


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_yaml(path: Path) -> dict[str, Any]:
    """Parse a YAML mapping; a syntax error becomes one line naming file:line."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not a YAML text file (not UTF-8: binary?)") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError(f"malformed YAML at {where}: {err.problem}") from None
    except yaml.YAMLError as err:  # e.g. control characters the reader refuses
        raise SpecError(f"malformed YAML in {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SpecError(f"malformed YAML in {path}: expected a mapping at the top level")
    return data


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _deep_merge(base[key], value) if both_dicts else value
    return merged


def load_profile(name: str) -> dict[str, Any]:
    """A profile's YAML: a shipped one by name, or the user's own file (a path ending in .yaml);
    `extends: other` starts from another profile and overrides its keys. A file not found here
    that a loaded record was made with is the resolved profile that record carries."""
    if name in _RECORDED_PROFILES and not Path(name).is_file():
        return copy.deepcopy(_RECORDED_PROFILES[name])
    return copy.deepcopy(_load_profile(name))  # a copy: callers may change what they get


# Profile file → the resolved profile a record made with it carries (RunStore.load fills it), so
# that a run can be evaluated again or exported from another directory.
_RECORDED_PROFILES: dict[str, dict[str, Any]] = {}


def remember_profile(name: str, profile: dict[str, Any]) -> None:
    if name.endswith((".yaml", ".yml")):
        _RECORDED_PROFILES[name] = profile


@cache  # reports resolve hundreds of specs; parse each profile once
def _load_profile(name: str) -> dict[str, Any]:
    profile = _extended_profile(name, ())
    _check_profile(name, profile)
    return profile


# Every top-level key a profile may hold (the shipped ones use all of them but trust_remote_code).
PROFILE_KEYS: dict[str, type | tuple[type, ...]] = {
    "extends": str, "name": str, "description": str, "model": str, "device": str, "dtype": str,
    "prompt_template": str, "country_iso_code": str, "estimate": str, "requires_gpu": bool,
    "trust_remote_code": bool, "seed": int, "train": dict, "adapter": dict, "eval": dict,
    "sharding": dict, "slurm": dict, "tasks": dict}
TASK_KEYS = {"corpus": str, "local_corpus": str, "eval": list}


def _extended_profile(name: Any, chain: tuple[str, ...]) -> dict[str, Any]:
    """The profile `name` with what it `extends:`, its own keys checked; `chain` finds loops."""
    _require(isinstance(name, str), f"extends must name a profile, got {name!r}")
    _require(name not in chain, f"profile extends loop: {' → '.join([*chain, name])}")
    if name.endswith((".yaml", ".yml")):
        _require(Path(name).is_file(), f"profile file {name} not found")
        profile = load_yaml(Path(name))
    elif name in profile_names():
        profile = load_yaml(PROFILE_DIR / f"{name}.yaml")
    else:
        raise did_you_mean("profile", name, profile_names())
    for key, value in profile.items():
        if key not in PROFILE_KEYS:
            raise did_you_mean(f"key in profile {name}:", key, list(PROFILE_KEYS))
        kind = PROFILE_KEYS[key]
        _require(isinstance(value, kind) and (kind is bool or not isinstance(value, bool)),
                 f"profile {name}: {key} must be {_KIND_NAMES[kind]}, got {value!r}")
    parent = profile.pop("extends", None)
    return _deep_merge(_extended_profile(parent, (*chain, name)), profile) if parent else profile


_KIND_NAMES = {str: "a string", bool: "true or false", int: "an integer", dict: "a mapping"}


def _check_profile(name: str, profile: dict[str, Any]) -> None:
    """What the resolved profile needs: a model, and tasks that each name a corpus and a list of
    lm-eval tasks."""
    _require("model" in profile, f"profile {name} names no model")
    for task, entry in profile.get("tasks", {}).items():
        _require(isinstance(entry, dict), f"profile {name}: task {task} must be a mapping with "
                                          f"corpus and eval, got {entry!r}")
        for key, value in entry.items():
            _require(key in TASK_KEYS, f"profile {name}: task {task} has unknown key {key!r}; "
                                       f"valid: {', '.join(TASK_KEYS)}")
            _require(isinstance(value, TASK_KEYS[key]) and (key != "eval" or (value and all(
                isinstance(t, str) for t in value))), f"profile {name}: task {task}: {key} must "
                f"be {'a list of lm-eval task names' if key == 'eval' else 'a string'}, "
                f"got {value!r}")
        for key in ("corpus", "eval"):
            _require(key in entry, f"profile {name}: task {task} has no {key}")


SHARDING_DIR = Path(str(resources.files("hydrabench") / "sharding"))
SHARDING_KEYS = {"reshard_after_forward": bool, "reduce_dtype": (str, type(None)),
                 "cpu_offload": bool}


def load_sharding(name: str) -> dict[str, Any]:
    """A shipped FSDP config, checked and resolved with its name (recorded in the spec)."""
    return dict(_load_sharding(name))  # a copy: the spec owns what it gets


@cache  # every resolved spec of the method reads it; parse it once
def _load_sharding(name: str) -> dict[str, Any]:
    names = sorted(p.stem for p in SHARDING_DIR.glob("*.yaml"))
    if name not in names:
        raise did_you_mean("sharding config", name, names)
    options = load_yaml(SHARDING_DIR / f"{name}.yaml")
    for key, value in options.items():
        _require(key in SHARDING_KEYS, f"unknown key {key!r} in sharding config {name}; "
                                       f"valid: {', '.join(SHARDING_KEYS)}")
        _require(isinstance(value, SHARDING_KEYS[key]),
                 f"sharding config {name}: {key} has the wrong type ({value!r})")
    return {"name": name, **options}


def _typed(name: str, value: Any, annotation: str, where: str) -> Any:
    """`value` as the settings field's declared type, or one line saying what it must be.

    YAML reads `1e-3` (no dot) as a string: a string that is a number is taken as one. Floats
    must be finite; a bool is not a number; a single string is one target module.
    """
    kinds = annotation.replace(" ", "").split("|")
    if value is None and "None" in kinds:
        return None
    if "float" in kinds and not isinstance(value, bool):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, (int, float)):
            _require(math.isfinite(number), f"{where} setting {name} must be a finite number, "
                                            f"got {value!r}")
            return float(number)
    if "int" in kinds and isinstance(value, int) and not isinstance(value, bool):
        return value
    if "bool" in kinds and isinstance(value, bool):
        return value
    if "str" in kinds and isinstance(value, str):
        return value
    if annotation.startswith("tuple[str"):
        modules = (value,) if isinstance(value, str) else value
        if isinstance(modules, (list, tuple)) and all(isinstance(m, str) for m in modules):
            return tuple(modules)
    if annotation.startswith("dict") and isinstance(value, dict):
        return value
    wanted = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string",
              "None": "null"}
    described = " or ".join(wanted.get(k, "a list of names" if k.startswith("tuple") else
                                       "a mapping") for k in kinds)
    raise SpecError(f"{where} setting {name} must be {described}, got {value!r}")


def _settings(cls: type, values: dict[str, Any], where: str):
    _require(isinstance(values, dict), f"{where} settings must be a mapping, got {values!r}")
    declared = {f.name: str(f.type) for f in fields(cls)}
    unknown = set(values) - set(declared)
    _require(not unknown,
             f"unknown {where} setting(s) {sorted(unknown)}; valid: {sorted(declared)}")
    return cls(**{name: _typed(name, value, declared[name], where)
                  for name, value in values.items()})


# `eval --task lm-eval:bbh` names lm-eval's task where a profile column has the same name.
LM_EVAL_PREFIX = "lm-eval:"


def resolve_spec(method: str, task: str, profile: str = "tiny", seed: int | None = None,
                 model: str | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                 valid_methods: list[str] | None = None, lm_eval_task_ok: bool = False,
                 trust_remote_code: bool = False) -> RunSpec:
    """Profile YAML + CLI overrides ({"train": {...}, "adapter": {...}, "eval": {...}}).

    `task` is a column of the profile; with `lm_eval_task_ok` any other name is taken as one
    lm-eval task (checked against lm-eval's registry before the run starts).
    """
    prof = load_profile(profile)
    seed = prof.get("seed", 0) if seed is None else seed  # a profile may name its recipe's seed
    _require(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32,
             f"seed must be an integer in [0, 2**32), got {seed!r}")
    if valid_methods is not None and method not in valid_methods:
        raise did_you_mean("method", method, valid_methods)
    tasks = dict(prof.get("tasks", {}))
    if lm_eval_task_ok and task.startswith(LM_EVAL_PREFIX):  # the lm-eval task, not a column
        task = task.removeprefix(LM_EVAL_PREFIX)
        tasks[task] = {"corpus": "none", "eval": [task]}
    if task not in tasks and lm_eval_task_ok:
        tasks[task] = {"corpus": "none", "eval": [task]}
    if task not in tasks:
        raise did_you_mean("task", task, list(tasks))
    # Offline (local benchmark copies configured), train on the local copy where there is one.
    offline = bool(os.environ.get("HYDRABENCH_DATA_DIR"))
    corpus = tasks[task].get("local_corpus") if offline else None
    overrides = overrides or {}
    # A method's own defaults (LoRAMoE's FFN experts) beat the profile's, never the user's flags.
    from hydrabench.methods import METHODS

    method_defaults = {"adapter": getattr(METHODS.get(method), "adapter_defaults", {})}
    section = {key: {**prof.get(key, {}), **method_defaults.get(key, {}), **overrides.get(key, {})}
               for key in ("train", "adapter", "eval")}
    # The profile names, per method, the FSDP config its multi-process training shards with.
    sharding = prof.get("sharding", {}).get(method)
    if sharding is not None:
        section["train"]["sharding"] = load_sharding(sharding)
    eval_settings = _settings(EvalSettings, section["eval"], "eval")
    model = model or prof["model"]
    if eval_settings.backend == "auto":  # decided here, so the run id names the real backend
        from hydrabench.export import auto_backend

        targets = _settings(AdapterSettings, section["adapter"], "adapter").target_modules
        eval_settings = replace(eval_settings, backend=auto_backend(
            method, model, targets, eval_settings.tensor_parallel_size))
    if section["eval"].get("backend") == "auto" and eval_settings.backend == "vllm" and (
            not _vllm_serves_here(model)):
        eval_settings = replace(eval_settings, backend="hf")
    corpus = corpus or tasks[task]["corpus"]
    eval_tasks = tuple(tasks[task]["eval"])
    return RunSpec(
        method=method, task=task, profile=profile, model=model, seed=seed, corpus=corpus,
        eval_tasks=eval_tasks, inputs=fingerprint_inputs(model, corpus, eval_tasks),
        device=prof.get("device", "cpu"), dtype=prof.get("dtype", "float32"),
        prompt_template=prof.get("prompt_template", "plain"),
        country_iso_code=prof.get("country_iso_code", "USA"),
        trust_remote_code=trust_remote_code or bool(prof.get("trust_remote_code", False)),
        train=_settings(TrainSettings, section["train"], "train"),
        adapter=_settings(AdapterSettings, section["adapter"], "adapter"),
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


def spec_from_dict(data: dict[str, Any]) -> RunSpec:
    """Rebuild a RunSpec from a record's `spec` (the inverse of RunSpec.to_dict)."""
    nested = {"train": TrainSettings, "adapter": AdapterSettings, "eval": EvalSettings,
              "inputs": InputFingerprints}
    values = {k: (_settings(nested[k], v, k) if k in nested else v) for k, v in data.items()}
    values["eval_tasks"] = tuple(values["eval_tasks"])
    return RunSpec(**values)


def retarget(trained: RunSpec, task: str, eval_overrides: dict[str, Any]) -> RunSpec:
    """The same training (hence the same artifact) scored on another column or lm-eval task."""
    column = resolve_spec(trained.method, task, trained.profile, trained.seed,
                          lm_eval_task_ok=True)
    return replace(trained, task=column.task, eval_tasks=column.eval_tasks,
                   inputs=replace(trained.inputs, tasks=column.inputs.tasks),
                   eval=replace(trained.eval, **eval_overrides))


def runtime_device(spec: RunSpec) -> str:
    """The device to run on here. `auto` (kept as is in the spec, so run ids do not depend on the
    machine) means CUDA when available; a GPU-only profile's default model refuses the CPU."""
    import torch

    has_cuda = torch.cuda.is_available()
    profile = load_profile(spec.profile)
    if profile.get("requires_gpu") and not has_cuda and spec.model == profile["model"]:
        raise SpecError(f"profile {spec.profile} needs a GPU for {spec.model} and none is "
                        "visible; pass --model with a small local model to check its wiring on "
                        "CPU")
    device = ("cuda" if has_cuda else "cpu") if spec.device == "auto" else spec.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per torchrun process
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device
