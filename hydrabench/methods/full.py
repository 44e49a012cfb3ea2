"""`full`: full fine-tuning, every parameter trainable (Table 2's upper reference)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hydrabench.config.spec import RunSpec
from hydrabench.data.records import InstructionRecord
from hydrabench.methods.api import Method


def _adapt(model: torch.nn.Module, spec: RunSpec,
           records: Sequence[InstructionRecord]) -> torch.nn.Module:
    model.requires_grad_(True)
    return model


def _save(model: torch.nn.Module, directory: Path) -> None:
    model.save_pretrained(directory)


def _load(base: torch.nn.Module, directory: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=base.dtype)


METHOD = Method(name="full", description="full fine-tuning (all parameters trainable)",
                adapt=_adapt, save=_save, load=_load, merge=lambda model: model,
                adapts_target_modules=False)
