"""`hydrabench export RUN`: a standalone HF checkpoint (safetensors + tokenizer) to serve.

Mergeable methods merge exactly (peft's merge_and_unload, full FT as is). HydraLoRA's gate depends
on every token, so no single merge is exact. For the methods whose artifact is a HydraLoRA adapter
(hydralora, hydralora-uniform, loramoe, lora-split) the exact export (`--merge exact`, the default)
is the base checkpoint plus the adapter, served per token by hydrabench's vLLM plugin
(`hydrabench.serving_plugin`); `load_base_model` loads it for hf. Two approximate merges stay:
`uniform` uses g = 1/N, `router-mean` the router's gate averaged over the prompts of the run's
evaluated task (one checkpoint per task).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from hydrabench.atomic import write_json_atomic
from hydrabench.errors import SpecError
from hydrabench.evaluate import read_samples
from hydrabench.metering import Meter
from hydrabench.methods import get_method
from hydrabench.methods.api import Method
from hydrabench.methods.hydralora import (
    HydraLoraLinear,
    hydralora_layers,
    load_hydralora,
    mean_router_gates,
    merge_hydralora,
    save_hydralora,
)
from hydrabench.models import load_base_model
from hydrabench.profiles import runtime_device
from hydrabench.serving_plugin import (
    ADAPTER_DIR,
    PluginError,
    check_adapter_config,
    check_covered,
    plugin_architecture,
    read_adapter_config,
)
from hydrabench.spec import RunSpec
from hydrabench.store import RunStore

HYDRALORA_MERGES = ("uniform", "router-mean")
EXPORT_INFO = "hydrabench_export.json"


def task_prompts(run_dir: Path) -> list[str]:
    """The prompts lm-eval sent for this run, read back from its per-sample outputs."""
    prompts = [row["arguments"][0][0] for _, row in read_samples(run_dir / "lm_eval")]
    return list(dict.fromkeys(prompts))  # multiple-choice docs repeat their context per choice


def merge_loaded(spec: RunSpec, model: torch.nn.Module, tokenizer, merge: str | None,
                 run_dir: Path | None = None) -> tuple[torch.nn.Module, str]:
    """(plain transformers model, merge label) from a model with the method's adapter loaded.

    `run_dir` holds the evaluated prompts that a router-mean merge averages the gate over.
    """
    method = get_method(spec.method)
    if method.mergeable:
        if merge not in (None, "exact"):
            raise SpecError(f"{spec.method} merges exactly; --merge {merge} is for HydraLoRA only")
        return method.merge(model), "exact"
    if not hydralora_layers(model):
        raise SpecError(f"method {spec.method} cannot be merged into a standalone checkpoint")
    if merge not in HYDRALORA_MERGES:
        raise SpecError(f"HydraLoRA's per-token gate has no exact merge: choose --merge "
                        f"{' or '.join(HYDRALORA_MERGES)}, or serve it unmerged (--merge exact)")
    if merge == "uniform":
        return merge_hydralora(model, "uniform"), merge
    if run_dir is None:
        raise SpecError("a router-mean merge needs a finished run's evaluated prompts")
    batches = [tokenizer(p, return_tensors="pt") for p in task_prompts(run_dir)]
    return merge_hydralora(model, mean_router_gates(model, batches)), merge


def served_by_plugin(method: Method) -> bool:
    """Methods whose artifact is a HydraLoRA adapter (hydralora, hydralora-uniform, loramoe,
    lora-split): no merge is exact; hydrabench's vLLM plugin serves them exactly."""
    return method.load is load_hydralora


def check_servable(spec: RunSpec, method: Method, model: torch.nn.Module) -> None:
    """Fail before any work when the spec's backend cannot serve this run exactly (`model`: the
    loaded base model, whose config names its architecture)."""
    if spec.eval.backend == "hf":
        return
    from_export = bool(hydralora_layers(model))  # `eval --model` of a plugin export
    if not (method.mergeable or served_by_plugin(method) or from_export):
        raise SpecError(f"method {spec.method} cannot be merged, so it cannot be served by "
                        f"{spec.eval.backend}; use --backend hf")
    if not (served_by_plugin(method) or from_export):
        return
    targets = model.hydralora_config.target_modules if from_export else spec.adapter.target_modules
    try:
        check_covered([type(model).__name__], targets, spec.eval.tensor_parallel_size)
    except PluginError as err:
        raise SpecError(str(err)) from None


def auto_backend(method_name: str, model: str, target_modules: tuple[str, ...],
                 tensor_parallel_size: int) -> str:
    """Backend `auto`: vllm where it serves the method exactly (merged weights; the plugin for
    a HydraLoRA-family method on an architecture, targets and parallelism it covers), else hf."""
    from hydrabench.methods import METHODS

    method = METHODS.get(method_name)
    if method is None or not (method.mergeable or served_by_plugin(method)):
        return "hf"
    if method.mergeable:
        return "vllm"
    try:
        check_covered(_architectures(model), target_modules, tensor_parallel_size)
    except PluginError:
        return "hf"
    return "vllm"


def _architectures(model: str) -> list[str]:
    """The `architectures` of a model's config; none when it cannot be read here."""
    from transformers import AutoConfig

    from hydrabench.models import resolve_model_dir

    directory = resolve_model_dir(model)
    try:
        config = AutoConfig.from_pretrained(str(directory) if directory else model)
    except (OSError, ValueError):
        return []
    return list(config.architectures or [])


@contextmanager
def base_layers_in_place(model: torch.nn.Module,
                         layers: Mapping[str, HydraLoraLinear]) -> Iterator[None]:
    """Inside the block each HydraLoRA layer's frozen base linear is back in its place, so
    save_pretrained writes the base checkpoint itself; the adapter comes back afterwards."""
    def put(path: str, module: torch.nn.Module) -> None:
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, module)

    for path, layer in layers.items():
        put(path, layer.base)
    try:
        yield
    finally:
        for path, layer in layers.items():
            put(path, layer)


def save_plugin_checkpoint(model: torch.nn.Module, tokenizer, directory: Path,
                           run_id: str) -> None:
    """The exact servable export of a HydraLoRA-family model: the base checkpoint, the adapter in
    hydralora/ (as save_hydralora writes it), config.json's architectures naming the plugin
    class. vLLM serves it with hydrabench's plugin; `load_base_model` loads it for hf."""
    try:  # transformers loads a plugin export as its base class too
        architecture = plugin_architecture([type(model).__name__])
    except PluginError as err:
        raise SpecError(str(err)) from None
    with torch.no_grad(), base_layers_in_place(model, hydralora_layers(model)):
        model.save_pretrained(directory, safe_serialization=True)
    save_hydralora(model, directory / ADAPTER_DIR)
    tokenizer.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    write_json_atomic(directory / "config.json", {**config, "architectures": [architecture]})
    write_json_atomic(directory / EXPORT_INFO, {"run_id": run_id, "merge": "exact",
                                                "exact": True, "served_by": architecture})


# What loading a damaged adapter raises: a truncated or missing file, a config that is not JSON
# or lacks a key, tensors whose shapes differ from what the config builds (torch's RuntimeError).
ADAPTER_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def with_exported_adapter(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """The exact hf model of a plugin export: its base model with the adapter in hydralora/."""
    adapter = directory / ADAPTER_DIR
    try:
        check_adapter_config(read_adapter_config(directory))
        return load_hydralora(model, adapter)
    except torch.OutOfMemoryError:
        raise
    except ADAPTER_ERRORS as err:
        raise SpecError(f"cannot load the HydraLoRA adapter in {adapter}: "
                        f"{_first_line(err)}") from None


def load_trained(method: Method, model: torch.nn.Module, artifact: Path) -> torch.nn.Module:
    """`method.load` of a trained artifact; a damaged one (a file cut short, a config whose
    shapes do not match its tensors) is one line naming it."""
    try:
        return method.load(model, artifact)
    except torch.OutOfMemoryError:
        raise
    except ADAPTER_ERRORS as err:
        raise SpecError(f"cannot load the trained artifact in {artifact}: "
                        f"{type(err).__name__}: {_first_line(err)}") from None


def write_servable(spec: RunSpec, model: torch.nn.Module, tokenizer, directory: Path,
                   run_id: str, merge: str | None = None, run_dir: Path | None = None) -> str:
    """Write the checkpoint vLLM serves for a loaded run into `directory`; return the merge
    label. A HydraLoRA-family model is written unmerged for the plugin unless an approximate
    merge is asked for; the model itself is left as it was."""
    if hydralora_layers(model) and merge in (None, "exact"):
        save_plugin_checkpoint(model, tokenizer, directory, run_id)
        return "exact"
    merged, label = merge_loaded(spec, model, tokenizer, merge, run_dir)
    save_checkpoint(merged, tokenizer, directory, run_id, label)
    return label


def loaded_run(run_id: str, store: RunStore) -> tuple[RunSpec, torch.nn.Module, object]:
    """(spec, model with the run's adapter loaded, tokenizer) of a finished run (none, or a
    corrupt record: one line naming it)."""
    spec, record = store.load_spec(run_id), store.load(run_id)
    base = load_base_model(spec.model, spec.dtype, runtime_device(spec),
                           spec.trust_remote_code)
    model = load_trained(get_method(spec.method), base.model, record.artifact)
    return spec, model, base.tokenizer



def save_checkpoint(model: torch.nn.Module, tokenizer, directory: Path, run_id: str,
                    label: str) -> None:
    """Write a merged model as a standalone HF checkpoint (safetensors + tokenizer)."""
    with torch.no_grad():
        model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    write_json_atomic(directory / EXPORT_INFO,
                      {"run_id": run_id, "merge": label, "exact": label == "exact"})


def export_run(run_id: str, merge: str | None = None, store: RunStore | None = None) -> Path:
    """Write results/exports/<run_id>[-<merge>]/ atomically and return it."""
    store = store or RunStore()
    store.load_spec(run_id)  # a run id, a record, a whole one: checked before the lock is made
    label = merge if merge in HYDRALORA_MERGES else "exact"
    with Meter(phase="export") as meter:
        spec, model, tokenizer = loaded_run(run_id, store)  # a damaged artifact: before any write
        with store.lock(f"export-{run_id}-{merge}"):
            final = store.root / "exports" / (run_id if label == "exact" else f"{run_id}-{label}")
            with store.staging(final) as scratch:
                write_servable(spec, model, tokenizer, scratch, run_id, merge,
                               store.runs / run_id)
    write_json_atomic(final / "metering.json", meter.result.to_dict())
    return final
