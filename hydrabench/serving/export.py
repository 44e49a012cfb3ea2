"""`hydrabench export RUN`: a standalone HF checkpoint (safetensors + tokenizer) to serve.

Mergeable methods merge exactly (peft's merge_and_unload, full FT as is). A method the vLLM plugin
serves (`Method.served_by_plugin`: HydraLoRA's family, molora and flylora, whose gate depends on
every token, so no single merge is exact) is exported exactly (`--merge exact`, the default) as the
base checkpoint plus the adapter, served per token by hydrabench's vLLM plugin
(`hydrabench.serving.plugin`); `load_base_or_export` loads it for hf. A method's approximate merges
(`Method.approximate_merges`, HydraLoRA's `uniform` and `router-mean`) are the other choices of
--merge; one calibrated on the run's evaluated prompts gives one checkpoint per task.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from hydrabench.atomic import write_json_atomic
from hydrabench.config.profiles import runtime_device
from hydrabench.config.spec import RunSpec
from hydrabench.errors import SpecError
from hydrabench.evaluation.harness import read_samples
from hydrabench.methods import get_method
from hydrabench.methods.api import Method
from hydrabench.models import BaseModel, load_base_model
from hydrabench.models.exports import export_model_type
from hydrabench.records.store import RunStore
from hydrabench.serving.plugin import (
    ADAPTER_DIR,
    PluginError,
    check_adapter_config,
    check_covered,
    is_plugin_export,
    plugin_architecture,
    read_adapter_config,
)
from hydrabench.training.metering import Meter

EXPORT_INFO = "hydrabench_export.json"


def task_prompts(run_dir: Path) -> list[str]:
    """The prompts lm-eval sent for this run, read back from its per-sample outputs."""
    prompts = [row["arguments"][0][0] for _, row in read_samples(run_dir / "lm_eval")]
    return list(dict.fromkeys(prompts))  # multiple-choice docs repeat their context per choice


def merge_loaded(spec: RunSpec, model: torch.nn.Module, tokenizer, merge: str | None,
                 run_dir: Path | None = None) -> tuple[torch.nn.Module, str]:
    """(plain transformers model, merge label) from a model with the method's adapter loaded.

    `run_dir` holds the evaluated prompts that a calibrated approximate merge reads.
    """
    method = serving_method(spec)
    if method.mergeable:
        if merge not in (None, "exact"):
            raise SpecError(f"{spec.method} merges exactly; --merge {merge} is for methods "
                            f"without an exact merge")
        return method.merge(model), "exact"
    merges = method.approximate_merges
    if not merges:
        raise SpecError(f"method {spec.method} cannot be merged into a standalone checkpoint")
    if merge not in merges:
        unmerged = ", or serve it unmerged (--merge exact)" if method.served_by_plugin else ""
        raise SpecError(f"{spec.method} has no exact merge: choose --merge "
                        f"{' or '.join(merges)}{unmerged}")

    def prompts() -> list:
        if run_dir is None:
            raise SpecError(f"a {merge} merge needs a finished run's evaluated prompts")
        return [tokenizer(p, return_tensors="pt") for p in task_prompts(run_dir)]

    return merges[merge](model, prompts), merge


def exported_model_dir(spec: RunSpec) -> Path | None:
    """The plugin export the spec names as its base model (`eval --model EXPORT`), else None."""
    directory = Path(spec.model)
    return (directory if not get_method(spec.method).trains and is_plugin_export(directory)
            else None)


def serving_method(spec: RunSpec) -> Method:
    """The method whose artifact the run's model carries: the spec's, or for a plugin export
    named as the base model, its adapter's (loaded with it by `load_base_or_export`)."""
    exported = exported_model_dir(spec)
    return get_method(read_adapter_config(exported)["method"] if exported else spec.method)


def check_servable(spec: RunSpec, model: torch.nn.Module) -> None:
    """Fail before any work when the spec's backend cannot serve this run exactly (`model`: the
    loaded base model, whose config names its architecture)."""
    if spec.eval.backend == "hf":
        return
    method = serving_method(spec)
    if not (method.mergeable or method.served_by_plugin):
        raise SpecError(f"method {spec.method} cannot be merged, so it cannot be served by "
                        f"{spec.eval.backend}; use --backend hf")
    if not method.served_by_plugin:
        return
    exported = exported_model_dir(spec)
    targets = (read_adapter_config(exported)["target_modules"] if exported
               else spec.adapter.target_modules)
    try:
        check_covered([type(model).__name__], targets, spec.eval.tensor_parallel_size)
    except PluginError as err:
        raise SpecError(str(err)) from None


def auto_backend(method_name: str, model: str, target_modules: tuple[str, ...],
                 tensor_parallel_size: int) -> str:
    """Backend `auto`: vllm where it serves the method exactly (merged weights; the plugin for
    a method it serves on an architecture, targets and parallelism it covers), else hf."""
    from hydrabench.methods import METHODS

    method = METHODS.get(method_name)
    if method is None or not (method.mergeable or method.served_by_plugin):
        return "hf"
    if method.mergeable:
        return "vllm"
    try:
        check_covered(_architectures(model), target_modules, tensor_parallel_size)
    except PluginError:
        return "hf"
    return "vllm"


def _architectures(model: str) -> tuple[str, ...]:
    """The `architectures` of a model's config; none when it cannot be read here."""
    from hydrabench.models import resolve_model_dir

    directory = resolve_model_dir(model)
    return _config_architectures(str(directory)) if directory else _hub_architectures(model)


@functools.cache
def _hub_architectures(model_id: str) -> tuple[str, ...]:
    """A hub model's `architectures`, fetched only where the hub takes a connection (else read
    from the hub cache alone: transformers retries an unreachable hub for ~25 s per read), and
    once per process: a report or a sweep's plan resolves several specs of one model."""
    from hydrabench.paths import hub_reachable

    return _config_architectures(model_id, local_files_only=not hub_reachable())


def _config_architectures(model: str, local_files_only: bool = False) -> tuple[str, ...]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, local_files_only=local_files_only)
    except (OSError, ValueError):
        return ()
    return tuple(config.architectures or ())


def save_plugin_checkpoint(method: Method, model: torch.nn.Module, tokenizer, directory: Path,
                           run_id: str) -> None:
    """The exact servable export of a model the vLLM plugin serves: the base checkpoint, the
    adapter in hydralora/ (as `method.save` writes it), config.json's architectures naming the
    plugin class and its model_type hydrabench's export type (models/exports.py: plain
    transformers refuses it rather than load the base without the adapter). vLLM serves it with
    hydrabench's plugin; `load_base_or_export` loads it for hf."""
    try:  # hydrabench loads a plugin export as its base class too
        architecture = plugin_architecture([type(model).__name__])
    except PluginError as err:
        raise SpecError(str(err)) from None
    model_type = export_model_type(model.config)
    with torch.no_grad(), method.base_layers_in_place(model):
        model.save_pretrained(directory, safe_serialization=True)
    method.save(model, directory / ADAPTER_DIR)
    tokenizer.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    write_json_atomic(directory / "config.json",
                      {**config, "architectures": [architecture], "model_type": model_type})
    write_json_atomic(directory / EXPORT_INFO, {"run_id": run_id, "merge": "exact",
                                                "exact": True, "served_by": architecture})


# What loading a damaged adapter raises: a truncated or missing file, a config that is not JSON
# or lacks a key, tensors whose shapes differ from what the config builds (torch's RuntimeError).
ADAPTER_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_base_or_export(name: str, dtype: str = "float32", device: str = "cpu",
                        trust_remote_code: bool = False) -> BaseModel:
    """`load_base_model`; for a plugin export (`hydrabench export --merge exact`: a base
    checkpoint plus an adapter) the exact hf model, the adapter loaded onto its base."""
    base = load_base_model(name, dtype, device, trust_remote_code)
    if base.directory is not None and is_plugin_export(base.directory):
        base.model = with_exported_adapter(base.model, base.directory).eval()
    return base


def with_exported_adapter(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """The exact hf model of a plugin export: its base model with the adapter in hydralora/."""
    adapter = directory / ADAPTER_DIR
    try:
        config = read_adapter_config(directory)
        check_adapter_config(config)
        return get_method(config["method"]).load(model, adapter)
    except torch.OutOfMemoryError:
        raise
    except ADAPTER_ERRORS as err:
        raise SpecError(f"cannot load the plugin adapter in {adapter}: "
                        f"{_first_line(err)}") from None


def load_trained(method: Method, model: torch.nn.Module, artifact: Path) -> torch.nn.Module:
    """`method.load` of a trained artifact; a damaged one (a file cut short, a config whose
    shapes do not match its tensors) is one line naming it."""
    try:
        loaded = method.load(model, artifact)
        check_adapter_matches(loaded, artifact)
        return loaded
    except torch.OutOfMemoryError:
        raise
    except ADAPTER_ERRORS as err:
        raise SpecError(f"cannot load the trained artifact in {artifact}: "
                        f"{type(err).__name__}: {_first_line(err)}") from None


def check_adapter_matches(model: torch.nn.Module, artifact: Path) -> None:
    """A peft artifact's tensors are the adapters its configs build: each tensor lands on a
    module its config targets, each targeted module gets its tensors. peft loads a mismatch
    with a warning, leaving the base model's weights where the adapter should be."""
    from peft import PeftModel, get_peft_model_state_dict
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors import safe_open

    if not isinstance(model, PeftModel):
        return
    for name in model.peft_config:  # peft saves a non-default adapter in a folder of its name
        weights = artifact / ("" if name == "default" else name) / SAFETENSORS_WEIGHTS_NAME
        if not weights.is_file():
            continue
        with safe_open(str(weights), "pt") as fh:
            saved = set(fh.keys())
        built = set(get_peft_model_state_dict(model, adapter_name=name))
        if saved != built:
            stray, missing = sorted(saved - built), sorted(built - saved)
            said = (f"{len(stray)} of its tensors match no module its adapter_config.json "
                    f"targets (e.g. {stray[0]})" if stray else
                    f"{len(missing)} adapter weights its adapter_config.json asks for are "
                    f"missing (e.g. {missing[0]})")
            raise ValueError(f"the adapter does not match its config: {said}")


def write_servable(spec: RunSpec, model: torch.nn.Module, tokenizer, directory: Path,
                   run_id: str, merge: str | None = None, run_dir: Path | None = None) -> str:
    """Write the checkpoint vLLM serves for a loaded run into `directory`; return the merge
    label. A model the vLLM plugin serves is written unmerged for it unless an approximate merge
    is asked for; the model itself is left as it was."""
    method = serving_method(spec)
    if method.served_by_plugin and merge in (None, "exact"):
        save_plugin_checkpoint(method, model, tokenizer, directory, run_id)
        return "exact"
    merged, label = merge_loaded(spec, model, tokenizer, merge, run_dir)
    save_checkpoint(merged, tokenizer, directory, run_id, label)
    return label


def checked_run(run_id: str, store: RunStore, trust_remote_code: bool = False
                ) -> tuple[RunSpec, Path]:
    """(spec, its own artifact folder) of a finished run, refused in one line where loading it
    would run code this command line did not allow (docs/security.md) or read another run's
    weights: a record is data, so it can neither switch on trust_remote_code nor name the
    artifact loaded."""
    spec, record = store.load_spec(run_id), store.load(run_id)
    wants_code = spec.trust_remote_code or (record.profile or {}).get("trust_remote_code")
    if wants_code and not trust_remote_code:
        raise SpecError(f"run {run_id} loads its model with trust_remote_code: loading it "
                        "runs the model repository's code; allow it with --trust-remote-code")
    if record.train_id is not None and record.train_id != spec.train_id:
        raise SpecError(f"record {store.record_path(run_id)}: its train_id {record.train_id} "
                        f"is not its spec's ({spec.train_id}): refused")
    return spec, record.artifact or store.artifact_dir(spec.train_id)


def loaded_run(run_id: str, store: RunStore, trust_remote_code: bool = False
               ) -> tuple[RunSpec, torch.nn.Module, BaseModel]:
    """(spec, model with the run's adapter loaded, the base it was loaded on: tokenizer and
    files) of a finished run (none, a corrupt record, a damaged artifact, or code the command
    line did not allow: one line). `trust_remote_code`: this command line's flag."""
    spec, artifact = checked_run(run_id, store, trust_remote_code)
    base = load_base_or_export(spec.model, spec.dtype, runtime_device(spec),
                               spec.trust_remote_code and trust_remote_code)
    return spec, load_trained(get_method(spec.method), base.model, artifact), base


def save_checkpoint(model: torch.nn.Module, tokenizer, directory: Path, run_id: str,
                    label: str) -> None:
    """Write a merged model as a standalone HF checkpoint (safetensors + tokenizer)."""
    with torch.no_grad():
        model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    write_json_atomic(directory / EXPORT_INFO,
                      {"run_id": run_id, "merge": label, "exact": label == "exact"})


def export_run(run_id: str, merge: str | None = None, store: RunStore | None = None,
               trust_remote_code: bool = False) -> Path:
    """Write results/exports/<run_id>[-<merge>]/ atomically and return it."""
    store = store or RunStore()
    # A run id, a record, a whole one, its own artifact, no code unasked: before the lock.
    spec, _ = checked_run(run_id, store, trust_remote_code)
    label = merge if merge in serving_method(spec).approximate_merges else "exact"
    with Meter(phase="export", device=runtime_device(spec)) as meter:
        # A damaged artifact: before any write.
        spec, model, base = loaded_run(run_id, store, trust_remote_code)
        with store.lock(f"export-{run_id}-{merge}"):
            final = store.export_dir(run_id, label)
            with store.staging(final) as scratch:
                write_servable(spec, model, base.tokenizer, scratch, run_id, merge,
                               store.run_dir(run_id))
    write_json_atomic(final / "metering.json", meter.result.to_dict())
    return final
