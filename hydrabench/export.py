"""`hydrabench export RUN`: a merged standalone HF checkpoint (safetensors + tokenizer) to serve.

Mergeable methods merge exactly (peft's merge_and_unload, full FT as is). HydraLoRA's gate depends
on every token, so no single merge is exact: `uniform` uses g = 1/N, `router-mean` the router's gate
averaged over the prompts of the run's evaluated task (one checkpoint per task).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hydrabench.evaluate import read_samples
from hydrabench.metering import Meter
from hydrabench.methods import get_method
from hydrabench.methods.hydralora import mean_router_gates, merge_hydralora
from hydrabench.models import load_base_model
from hydrabench.spec import RunSpec, SpecError, runtime_device, spec_from_dict
from hydrabench.store import RunStore, write_json_atomic

HYDRALORA_MERGES = ("uniform", "router-mean")


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
    if not spec.method.startswith("hydralora"):
        raise SpecError(f"method {spec.method} cannot be merged into a standalone checkpoint")
    if merge not in HYDRALORA_MERGES:
        raise SpecError(f"HydraLoRA has no exact merge: choose --merge "
                        f"{' or '.join(HYDRALORA_MERGES)}")
    if merge == "uniform":
        return merge_hydralora(model, "uniform"), merge
    if run_dir is None:
        raise SpecError("a router-mean merge needs a finished run's evaluated prompts")
    batches = [tokenizer(p, return_tensors="pt") for p in task_prompts(run_dir)]
    return merge_hydralora(model, mean_router_gates(model, batches)), merge


def merged_model(run_id: str, merge: str | None, store: RunStore):
    """(merged plain transformers model, tokenizer, merge label) for a finished run."""
    if not store.has(run_id):
        raise SpecError(f"no finished run {run_id!r} in {store.runs}")
    record = store.load(run_id)
    spec = spec_from_dict(record["spec"])
    base = load_base_model(spec.model, spec.dtype, runtime_device(spec),
                           spec.trust_remote_code)
    model = get_method(spec.method).load(base.model, Path(record["artifact"]))
    merged, label = merge_loaded(spec, model, base.tokenizer, merge, store.runs / run_id)
    return merged, base.tokenizer, label


def save_checkpoint(model: torch.nn.Module, tokenizer, directory: Path, run_id: str,
                    label: str) -> None:
    """Write a merged model as a standalone HF checkpoint (safetensors + tokenizer)."""
    with torch.no_grad():
        model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    write_json_atomic(directory / "hydrabench_export.json",
                      {"run_id": run_id, "merge": label, "exact": label == "exact"})


def export_run(run_id: str, merge: str | None = None, store: RunStore | None = None) -> Path:
    """Write results/exports/<run_id>[-<merge>]/ atomically and return it."""
    store = store or RunStore()
    if not store.has(run_id):  # checks the run id too, before the lock file is made
        raise SpecError(f"no finished run {run_id!r} in {store.runs}")
    with store.lock(f"export-{run_id}-{merge}"), Meter(phase="export") as meter:
        model, tokenizer, label = merged_model(run_id, merge, store)
        final = store.root / "exports" / (run_id if label == "exact" else f"{run_id}-{label}")
        with store.staging(final) as scratch:
            save_checkpoint(model, tokenizer, scratch, run_id, label)
    write_json_atomic(final / "metering.json", meter.result.to_dict())
    return final
