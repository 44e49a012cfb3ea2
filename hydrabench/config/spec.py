"""RunSpec: everything that decides a run's result, as plain frozen dataclasses.

The run id is a hash of the resolved spec, so identical requests find each other's records
(resume) and any change of a hyper-parameter gives a new run. The spec holds the content
fingerprints of what the run consumes (base model, corpus, task configs and data), so editing any
of them gives a new run too. Profiles and their resolution into a spec: hydrabench.config.profiles
and hydrabench.pipeline.resolve.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from hydrabench.data.records import TEMPLATES
from hydrabench.errors import SpecError, require

# What a profile's dtype and device may be (device `auto`: CUDA when available, decided per run).
DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("cpu", "cuda", "mps", "auto")  # and cuda:N


def setting_help(section: type, name: str) -> str:
    """The help text of a settings field (its `metadata`, which never enters a spec's dict, so
    run ids do not depend on it): what the command line shows for its flag."""
    return next((f.metadata.get("help", "") for f in fields(section) if f.name == name), "")


def check_model_settings(where: str, device: Any, dtype: Any, prompt_template: Any) -> None:
    """The device, dtype and prompt template a profile (or a spec) names, one line each."""
    require(dtype in DTYPES, f"{where}: unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    require(device in DEVICES or (isinstance(device, str)
                                  and re.fullmatch(r"cuda:\d{1,3}", device) is not None),
            f"{where}: unknown device {device!r}; valid: {', '.join(DEVICES)}, cuda:N")
    require(prompt_template in TEMPLATES, f"{where}: unknown prompt_template "
                                          f"{prompt_template!r}; valid: {', '.join(TEMPLATES)}")


@dataclass(frozen=True)
class TrainSettings:
    lr: float = field(
        default=2e-4,
        metadata={"help": "peak learning rate (AdamW, cosine schedule with warm-up)"})
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    epochs: int = field(default=1, metadata={"help": "passes over the training corpus"})
    max_steps: int = field(
        default=0,
        metadata={"help": "stop after this many optimizer "
                            "steps (0: run the whole epochs)"})
    batch_size: int = field(
        default=8,
        metadata={"help": "training examples per optimizer step (per process)"})
    grad_accum: int = 1
    seq_len: int = field(
        default=1024,
        metadata={"help": "training sequence length in tokens (longer examples are cut)"})
    weight_decay: float = 0.0
    checkpoint_every: int = field(
        default=100,
        metadata={"help": "save a resumable checkpoint every this many steps"})
    # FSDP2 options (from hydrabench/config/sharding/<name>.yaml, resolved with their name) used
    # when torchrun launches several processes; None: each process holds the whole model (DDP).
    sharding: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(self.scheduler in ("cosine", "linear", "constant"),
                f"scheduler must be cosine, linear or constant, got {self.scheduler!r}")
        require(0 <= self.warmup_ratio < 1,
                f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        require(self.seq_len >= 8, f"seq_len must be >= 8, got {self.seq_len}")
        require(self.checkpoint_every >= 1,
                f"checkpoint_every must be >= 1, got {self.checkpoint_every}")


@dataclass(frozen=True)
class AdapterSettings:
    rank: int = field(
        default=8,
        metadata={"help": "LoRA rank r of each adapter (HydraLoRA: "
                            "of the shared A and each B head)"})
    alpha: float = field(
        default=32.0,
        metadata={"help": "LoRA scaling alpha (the update is scaled by alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter's input"})
    num_heads: int | str = field(
        default=4,
        metadata={"help": "HydraLoRA's B heads N, or auto: TF-IDF "
                            "+ k-means + elbow as the paper"})
    num_splits: int = field(
        default=4,
        metadata={"help": "LoRA-Split: the number of component LoRAs (of rank r each)"})
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    balance_loss_coef: float = field(
        default=0.0,
        metadata={"help": "weight of HydraLoRA's router load-balancing loss "
                            "(0: off, as the reference code)"})
    # LoRAMoE's localized balancing constraint: its weight, its imbalance (delta) and the record
    # components of the world-knowledge type (its code's blc_weight, blc_alpha, task_type 1)
    blc_weight: float = field(
        default=0.0,
        metadata={"help": "LoRAMoE's localized balancing constraint: its weight"})
    blc_alpha: float = field(
        default=0.0,
        metadata={"help": "LoRAMoE's localized balancing constraint: its imbalance delta"})
    blc_knowledge: tuple[str, ...] = ()
    # Added later (hence None, left out of the run and train ids, see `ID_OPTIONAL_ADAPTER`):
    # the experts (molora) or rank coordinates (flylora) kept per token, and FlyLoRA's share of
    # non-zero entries per row of its frozen A (None: its code's k / r)
    top_k: int | None = field(
        default=None,
        metadata={"help": "experts (molora) or rank coordinates (flylora) kept per token"})
    sparsity: float | None = field(
        default=None,
        metadata={"help": "FlyLoRA: share of non-zero entries per row of the frozen A, in (0, 1]"})

    def __post_init__(self) -> None:
        require(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        require(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        require(self.num_heads == "auto" or (isinstance(self.num_heads, int)
                                             and self.num_heads >= 1),
                f"num_heads must be >= 1 or 'auto', got {self.num_heads!r}")
        require(self.num_splits >= 1, f"num_splits must be >= 1, got {self.num_splits}")
        require(len(self.target_modules) > 0, "target_modules must name at least one module")
        require(self.balance_loss_coef >= 0,
                f"balance_loss_coef must be >= 0, got {self.balance_loss_coef}")
        require(self.blc_weight >= 0, f"blc_weight must be >= 0, got {self.blc_weight}")
        require(0 <= self.blc_alpha <= 1, f"blc_alpha must be in [0, 1], got {self.blc_alpha}")
        require(self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        require(self.sparsity is None or 0 < self.sparsity <= 1,
                f"sparsity must be in (0, 1], got {self.sparsity}")


# Adapter settings added after runs were recorded: left out of the run and train ids while at
# their default, so the ids of runs that do not use them stay what they were.
ID_OPTIONAL_ADAPTER = ("top_k", "sparsity")


def _id_payload(spec_dict: dict[str, Any]) -> dict[str, Any]:
    """The spec as its ids hash it: the settings added later dropped where at their default."""
    adapter = spec_dict["adapter"]
    for name in ID_OPTIONAL_ADAPTER:
        if adapter[name] == getattr(AdapterSettings, name):
            del adapter[name]
    if spec_dict["eval"]["serving"] == EvalSettings.serving:
        del spec_dict["eval"]["serving"]
    return spec_dict


# hf: lm-eval's HF backend on the in-memory model; vllm: a merged checkpoint served by vLLM (for
# HydraLoRA-family methods, molora and flylora the adapter, by hydrabench's plugin); auto
# (profiles only): vllm for the methods vLLM serves exactly on the model, hf for the others.
BACKENDS = ("hf", "vllm", "auto")
SERVING_MODES = ("merged", "adapters")


@dataclass(frozen=True)
class EvalSettings:
    backend: str = field(
        default="hf",
        metadata={"help": "hf (transformers), vllm (merged weights or the plugin) or auto"})
    batch_size: int = 16
    limit: int | None = field(
        default=None,
        metadata={"help": "score only the first N items of each task (a quick check)"})
    num_fewshot: int | None = None  # None: each task's own default
    allow_code_execution: bool = False
    # HydraLoRA: also score the approximate merges (uniform, router-mean) and record the gap
    merge_gap: bool = False
    # vLLM serving (backend vllm): parallelism and memory, passed to the server as they are
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None  # None: the model's own context length
    # merged: a checkpoint per run, each on a server of its own (the card's merged weights);
    # adapters: runs on one base model share a server, a LoRA adapter loaded per run (vLLM's
    # own LoRA serving, unmerged and exact); runs it cannot serve so keep a server each.
    serving: str = "merged"
    # lm-eval's --gen_kwargs ("max_gen_toks=128,temperature=0"), over each generation task's own
    gen_kwargs: str | None = field(
        default=None,
        metadata={"help": "lm-eval's generation settings, e.g. max_gen_toks=128,temperature=0"})

    def __post_init__(self) -> None:
        require(self.backend in BACKENDS,
                f"unknown backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        require(self.batch_size >= 1, f"eval batch_size must be >= 1, got {self.batch_size}")
        require(self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}")
        require(self.num_fewshot is None or self.num_fewshot >= 0,
                f"num_fewshot must be >= 0, got {self.num_fewshot}")
        require(self.tensor_parallel_size >= 1 and self.data_parallel_size >= 1,
                "tensor_parallel_size and data_parallel_size must be >= 1")
        require(self.gpu_memory_utilization is None or 0 < self.gpu_memory_utilization <= 1,
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        require(self.max_model_len is None or self.max_model_len >= 1,
                f"max_model_len must be >= 1, got {self.max_model_len}")
        check_gen_kwargs(self.gen_kwargs)
        require(self.serving in SERVING_MODES,
                f"unknown serving {self.serving!r}; valid: {', '.join(SERVING_MODES)}")


# lm-eval's generation settings a run may override (--gen-kwargs), each with what it must be:
# anything else would be found only when the first generation task runs, after training.
def _count(low: int) -> tuple[str, Any]:
    return (f"an integer >= {low}",
            lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low)


def _real(text: str, ok: Any) -> tuple[str, Any]:
    return (text, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) and ok(v))


GEN_KWARGS: dict[str, tuple[str, Any]] = {
    **dict.fromkeys(("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"),
                    _count(1)),
    "temperature": _real("a finite number >= 0", lambda v: v >= 0),
    "top_p": _real("a number in (0, 1]", lambda v: 0 < v <= 1),
    "min_p": _real("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "top_k": _count(0),
    "num_beams": _count(1),
    "repetition_penalty": _real("a finite number > 0", lambda v: v > 0),
    "do_sample": ("true or false", lambda v: isinstance(v, bool)),
    "until": ("a string", lambda v: isinstance(v, str) and v != ""),
    "seed": _count(0),
}


def check_gen_kwargs(gen_kwargs: str | None) -> None:
    """lm-eval's --gen_kwargs string, read as lm-eval reads it: key=value pairs of known keys,
    each value of its type and range."""
    if gen_kwargs is None:
        return
    pairs = [pair for pair in gen_kwargs.split(",") if pair]
    require(all("=" in pair for pair in pairs),
            f"gen_kwargs must be key=value pairs joined by commas (lm-eval's --gen_kwargs), "
            f"got {gen_kwargs!r}")
    from lm_eval.utils import handle_arg_string

    for key, text in (pair.split("=", 1) for pair in pairs):
        key = key.strip()
        if key not in GEN_KWARGS:
            raise SpecError(f"unknown gen_kwargs key {key!r}; valid: {', '.join(GEN_KWARGS)}")
        wanted, ok = GEN_KWARGS[key]
        require(ok(handle_arg_string(text)), f"gen_kwargs {key} must be {wanted}, got {text!r}")


@dataclass(frozen=True)
class InputFingerprints:
    """Content fingerprints (hydrabench.records.provenance) of the base model, of each corpus part,
    and of
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

    def __post_init__(self) -> None:
        check_model_settings(f"run {self.method}/{self.task}", self.device, self.dtype,
                             self.prompt_template)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _digest(self, payload: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def run_id(self) -> str:
        """Readable prefix plus a hash of the whole resolved spec (settings added later left out
        at their defaults, so that runs made before they existed keep their ids)."""
        payload = _id_payload(self.to_dict())
        return f"{self.method}-{self.task}-s{self.seed}-{self._digest(payload)}"

    @property
    def train_id(self) -> str:
        """Hash of what decides the trained weights only: columns sharing a corpus share it."""
        payload = _id_payload(self.to_dict())
        for key in ("task", "eval_tasks", "eval"):
            payload.pop(key)
        payload["inputs"].pop("tasks")
        return f"{self.method}-s{self.seed}-{self._digest(payload)}"

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
            require(math.isfinite(number), f"{where} setting {name} must be a finite number, "
                                           f"got {value!r}")
            return float(number)
    if "int" in kinds and isinstance(value, int) and not isinstance(value, bool):
        # Beyond 64 bits, torch, numpy and lm-eval fail on it with a traceback.
        require(abs(value) < 2**63, f"{where} setting {name} must be below 2**63, got {value}")
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


def parse_settings(cls: type, values: dict[str, Any], where: str):
    """`cls` (a settings dataclass) from a mapping, each value checked against its field's type."""
    require(isinstance(values, dict), f"{where} settings must be a mapping, got {values!r}")
    declared = {f.name: str(f.type) for f in fields(cls)}
    unknown = set(values) - set(declared)
    require(not unknown,
             f"unknown {where} setting(s) {sorted(unknown)}; valid: {sorted(declared)}")
    return cls(**{name: _typed(name, value, declared[name], where)
                 for name, value in values.items()})


def with_settings(settings: Any, values: dict[str, Any], where: str) -> Any:
    """`settings` (a settings dataclass) with `values` replaced, each checked as
    `parse_settings` checks a profile's."""
    parsed = parse_settings(type(settings), values, where)
    return replace(settings, **{name: getattr(parsed, name) for name in values})


def spec_from_dict(data: dict[str, Any]) -> RunSpec:
    """Rebuild a RunSpec from a record's `spec` (the inverse of RunSpec.to_dict)."""
    nested = {"train": TrainSettings, "adapter": AdapterSettings, "eval": EvalSettings,
              "inputs": InputFingerprints}
    values = {k: (parse_settings(nested[k], v, k) if k in nested else v) for k, v in data.items()}
    values["eval_tasks"] = tuple(values["eval_tasks"])
    return RunSpec(**values)
