"""`ia3`: (IA)³ via peft's IA3Config: learned vectors that rescale keys, values and the FFN input.

The targets are peft's defaults for the architecture, which follow Liu et al. (2022): for Llama
k_proj, v_proj and down_proj, down_proj being the feed-forward module whose input (not output) is
rescaled. The spec's target_modules name LoRA's targets and do not apply. LLaMA-2-7B:
32 layers × (4096 + 4096 + 11008) = 614k parameters, the paper's 0.009 %Param. The vectors fold
into the weights, so the method is mergeable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import IA3Config, get_peft_model

from hydrabench.config.spec import RunSpec
from hydrabench.data.records import InstructionRecord
from hydrabench.methods.api import Method
from hydrabench.methods.lora import load_peft, merge_peft, save_peft


def _adapt(model: torch.nn.Module, spec: RunSpec,
           records: Sequence[InstructionRecord]) -> torch.nn.Module:
    return get_peft_model(model, IA3Config(task_type="CAUSAL_LM"))


METHOD = Method(name="ia3", description="(IA)³ via peft (rescales keys, values and the FFN input)",
                adapt=_adapt, save=save_peft, load=load_peft, merge=merge_peft)
