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


def load_peft(base: torch.nn.Module, directory: Path) -> torch.nn.Module:
    return PeftModel.from_pretrained(base, directory)


def merge_peft(model: torch.nn.Module) -> torch.nn.Module:
    return model.merge_and_unload()


METHOD = Method(name="lora", description="LoRA via peft (rank r on the target modules)",
                adapt=_adapt, save=save_peft, load=load_peft, merge=merge_peft)
