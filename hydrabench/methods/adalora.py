"""`adalora`: AdaLoRA via peft's AdaLoraConfig: LoRA in SVD form (P Λ Q) whose rank budget is
reallocated across the adapted matrices during training, by importance.

Budget: target_r is the spec's rank (8 in Table 2) and init_r 1.5 times that (12 for r = 8, as
peft's AdaLoraConfig defaults). %Param counts the init_r allocation trained, as the paper's 0.093
(1.5 × LoRA r=8's 0.062); the saved adapter keeps only the final ranks, target_r per matrix on
average.

Schedule: AdaLoRA needs the run's number of optimizer steps up front. The first 10% of steps train
at init_r (tinit), the budget then shrinks towards target_r every step (deltaT = 1), and the last
20% (tfinal, at least one step so the final allocation happens) train the final ranks. The
reallocation runs after every optimizer step through `Method.step_callback`; its importance
averages live outside the parameters, so a run resumed from a checkpoint restarts them and is not
bit-identical to an uninterrupted one.

The adapter merges like LoRA (merge_and_unload), so the method is mergeable.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import AdaLoraConfig, get_peft_model

from hydrabench.config.spec import RunSpec
from hydrabench.data.records import InstructionRecord
from hydrabench.methods.api import Method
from hydrabench.methods.lora import load_peft, merge_peft, save_peft
from hydrabench.training.loop import optimizer_steps


def adalora_config(spec: RunSpec, total_steps: int) -> AdaLoraConfig:
    tinit = total_steps // 10
    # peft requires tinit < total_steps - tfinal: a one-step run gets no final phase.
    tfinal = min(max(1, total_steps // 5), total_steps - tinit - 1)
    adapter = spec.adapter
    return AdaLoraConfig(target_r=adapter.rank, init_r=math.ceil(1.5 * adapter.rank),
                         tinit=tinit, tfinal=tfinal, deltaT=1, total_step=total_steps,
                         lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                         target_modules=list(adapter.target_modules), task_type="CAUSAL_LM")


def _adapt(model: torch.nn.Module, spec: RunSpec,
           records: Sequence[InstructionRecord]) -> torch.nn.Module:
    return get_peft_model(model, adalora_config(spec, optimizer_steps(len(records), spec.train)))


def _update_and_allocate(model: torch.nn.Module, step: int) -> None:
    model.base_model.update_and_allocate(step)


def _load(base: torch.nn.Module, directory: Path) -> torch.nn.Module:
    # The saved rank_pattern (the ranks each matrix kept) shrinks the matrices on load; peft's
    # generic check also reads it as LoRA's per-module ranks and warns that it matches no module.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The following rank_pattern keys did not match",
                                RuntimeWarning)
        return load_peft(base, directory)


METHOD = Method(name="adalora", description="AdaLoRA via peft (rank budget r, from 1.5 r)",
                adapt=_adapt, save=save_peft, load=_load, merge=merge_peft,
                step_callback=_update_and_allocate)
