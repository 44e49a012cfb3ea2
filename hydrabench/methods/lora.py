"""`lora`: LoRA through peft's LoraConfig (rank from the spec: r = 8/16/32 in the paper)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from hydrabench.config.spec import AdapterSettings, RunSpec
from hydrabench.data.records import InstructionRecord
from hydrabench.methods.api import Method


def lora_config(adapter: AdapterSettings, rank: int | None = None) -> LoraConfig:
    return LoraConfig(r=rank or adapter.rank, lora_alpha=adapter.alpha,
                      lora_dropout=adapter.dropout, target_modules=list(adapter.target_modules),
                      task_type="CAUSAL_LM")


def _adapt(model: torch.nn.Module, spec: RunSpec,
           records: Sequence[InstructionRecord]) -> torch.nn.Module:
    return get_peft_model(model, lora_config(spec.adapter))


def save_peft(model: torch.nn.Module, directory: Path) -> None:
    model.save_pretrained(directory)


def on_own_base(model: PeftModel, base: torch.nn.Module) -> PeftModel:
    """`model` with every adapter's config naming `base`, the model it was loaded onto: an
    artifact is data, and peft opens the config.json of the path its adapter_config names
    (when the model is saved again), which a planted artifact points anywhere."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = getattr(base, "name_or_path", None)
    return model


def load_peft(base: torch.nn.Module, directory: Path) -> torch.nn.Module:
    return on_own_base(PeftModel.from_pretrained(base, directory), base)


def merge_peft(model: torch.nn.Module) -> torch.nn.Module:
    return model.merge_and_unload()


METHOD = Method(name="lora", description="LoRA via peft (rank r on the target modules)",
                adapt=_adapt, save=save_peft, load=load_peft, merge=merge_peft)
