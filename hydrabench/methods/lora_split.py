"""`lora-split`: n independent peft LoRA adapters of rank r, adapter k trained on component k.

Components are the corpus's task labels when there are exactly n of them, else n TF-IDF k-means
clusters (the paper's way of finding intrinsic components). For inference the n adapters are
combined by peft's weighted-adapter merge (`cat`, weight 1 each) into one rank n·r LoRA, which
is mergeable like any LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

from hydrabench.data.clustering import cluster_labels
from hydrabench.data.records import InstructionRecord
from hydrabench.methods.api import Method, TrainFn
from hydrabench.methods.lora import lora_config, merge_peft
from hydrabench.spec import RunSpec

COMBINED = "combined"


def split_components(records: Sequence[InstructionRecord], n: int, seed: int) -> list[int]:
    """Component index of every record: task labels if the corpus has exactly n, else k-means."""
    labels = sorted({r.component for r in records if r.component})
    if len(labels) == n and all(r.component for r in records):
        return [labels.index(r.component) for r in records]
    return cluster_labels([r.instruction + " " + r.input for r in records], n, seed)


def adapt_splits(model: torch.nn.Module, spec: RunSpec,
                 records: Sequence[InstructionRecord]) -> torch.nn.Module:
    """n peft LoRA adapters split_0 .. split_{n-1}, untrained."""
    config = lora_config(spec.adapter)
    peft_model = get_peft_model(model, config, adapter_name="split_0")
    for k in range(1, spec.adapter.num_splits):
        peft_model.add_adapter(f"split_{k}", config)
    return peft_model


def train_splits(model: torch.nn.Module, spec: RunSpec, records: Sequence[InstructionRecord],
                 train_fn: TrainFn) -> tuple[list[str], dict]:
    """Train adapter split_k on component k alone: (adapter names, training summary)."""
    n = spec.adapter.num_splits
    component = split_components(records, n, spec.seed)
    total_steps = spec.train.max_steps
    summaries = {}
    for k in range(n):
        subset = [r for r, c in zip(records, component, strict=True) if c == k]
        # With a step budget, each adapter gets its share of it, proportional to its data.
        steps = max(1, math.ceil(total_steps * len(subset) / len(records))) if total_steps else None
        model.set_adapter(f"split_{k}")
        summaries[f"split_{k}"] = {"records": len(subset),
                                   **train_fn(model, subset, tag=f"split_{k}", max_steps=steps)}
    return list(summaries), {
        "splits": summaries, "steps": sum(s["steps"] for s in summaries.values()),
        "trained_tokens": sum(s["trained_tokens"] for s in summaries.values())}


def _fit(model: torch.nn.Module, spec: RunSpec, records: Sequence[InstructionRecord],
         train_fn: TrainFn) -> dict:
    names, summary = train_splits(model, spec, records, train_fn)
    model.add_weighted_adapter(names, [1.0] * len(names), adapter_name=COMBINED,
                               combination_type="cat")
    model.set_adapter(COMBINED)
    for name in names:
        model.delete_adapter(name)
    return summary


def save_combined(model: torch.nn.Module, directory: Path) -> None:
    model.save_pretrained(directory)  # peft writes a non-default adapter to directory/<name>


def load_combined(base: torch.nn.Module, directory: Path) -> torch.nn.Module:
    return PeftModel.from_pretrained(base, directory / COMBINED, adapter_name=COMBINED)


METHOD = Method(name="lora-split",
                description="n LoRAs of rank r, one per data component, merged (LoRA-Split n×r)",
                adapt=adapt_splits, save=save_combined, load=load_combined, merge=merge_peft,
                fit=_fit)
