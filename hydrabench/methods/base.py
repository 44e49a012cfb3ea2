"""`base`: the untouched pre-trained model (Table 2's first row); nothing is trained."""

from __future__ import annotations

from pathlib import Path

import torch

from hydrabench.methods.api import Method


def _save(model: torch.nn.Module, directory: Path) -> None:
    """Nothing to save: the artifact is the base model itself."""


def _load(base: torch.nn.Module, directory: Path) -> torch.nn.Module:
    return base


METHOD = Method(name="base", description="the pre-trained model, no fine-tuning",
                adapt=None, save=_save, load=_load, merge=lambda model: model,
                adapts_target_modules=False)
