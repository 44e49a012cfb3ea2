"""Table 2's prompt-learning baselines through peft: `prompt-tuning`, `p-tuning`, `prefix-tuning`.

All three condition the frozen model on learned virtual tokens, which cannot be folded into the
weights: they are not mergeable and are served by lm-eval's HF backend only. The number of virtual
tokens is a method setting fixed here (AdapterSettings has no field for it yet):

- prompt-tuning: 20 virtual input embeddings, initialised from sampled vocabulary embeddings
  (Lester et al. 2021 found that better than random). LLaMA-2-7B: 20 × 4096 = 82k parameters,
  the paper's 0.001 %Param.
- p-tuning: 256 virtual tokens, the paper's "P-Tuning (256)", through peft's default MLP prompt
  encoder (hidden size = model width), so most of its parameters are the encoder's.
- prefix-tuning: 20 virtual key/value pairs per layer, without reparameterisation. LLaMA-2-7B:
  20 × 32 layers × 2 × 4096 = 5.2M parameters, the paper's 0.077 %Param.

Scoring: prompt and p-tuning prepend the virtual tokens to the input embeddings, so peft returns
num_virtual_tokens extra leading logits. lm-eval's HF backend allows for that (it offsets the
scored positions by logits length minus input length), and peft's `generate` returns the input ids
followed by the new tokens as lm-eval expects (tests/test_peft_baselines.py checks both). Batched
generation needs one fix, made on load: see `_with_real_positions`. The virtual tokens also take
positions of the context window, which lm-eval does not subtract from the model's maximum length;
the paper's tasks stay far below LLaMA-2's 4096 either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import (
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
)

from hydrabench.config.spec import RunSpec
from hydrabench.data.records import InstructionRecord
from hydrabench.methods.api import Method
from hydrabench.methods.lora import load_peft, save_peft

PROMPT_TUNING_TOKENS = 20
P_TUNING_TOKENS = 256
PREFIX_TUNING_TOKENS = 20


def _with_real_positions(prepare: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """peft's prepare_inputs_for_generation for prompt and p-tuning, with position ids restored.

    peft drops the position ids, so the model numbers positions by cache slot. In a left-padded
    batch (lm-eval's generate_until) a row's real tokens then start as many positions after the
    virtual tokens as the row has pads, and its generation depends on the rest of the batch.
    Counting attended slots only, as transformers does for plain models, puts every row's tokens
    where an unpadded input (and training, which pads on the right) puts them. Prefix tuning needs
    no fix: peft offsets its position ids by the virtual tokens itself.
    """

    def with_positions(*args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = prepare(*args, **kwargs)
        mask = inputs.get("attention_mask")  # virtual tokens' slots included
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            positions = (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 1)
            embeds = inputs.get("inputs_embeds")  # the first step; then one new token id
            width = (inputs["input_ids"] if embeds is None else embeds).shape[1]
            inputs["position_ids"] = positions[:, -width:]
        return inputs

    return with_positions


def _load_prepending(base: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """Load prompt or p-tuning; peft's generate calls the instance's prepare function."""
    model = load_peft(base, directory)
    model.prepare_inputs_for_generation = _with_real_positions(model.prepare_inputs_for_generation)
    return model


def _method(name: str, description: str, make_config: Callable[[], PeftConfig],
            load: Callable[[torch.nn.Module, Path], torch.nn.Module]) -> Method:
    def adapt(model: torch.nn.Module, spec: RunSpec,
              records: Sequence[InstructionRecord]) -> torch.nn.Module:
        return get_peft_model(model, make_config())  # a fresh config: peft fills it in

    return Method(name=name, description=description, adapt=adapt, save=save_peft, load=load)


PROMPT_TUNING = _method(
    "prompt-tuning", f"Prompt Tuning via peft ({PROMPT_TUNING_TOKENS} virtual input tokens)",
    partial(PromptTuningConfig, task_type="CAUSAL_LM", num_virtual_tokens=PROMPT_TUNING_TOKENS,
            prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB),
    _load_prepending)
P_TUNING = _method(
    "p-tuning", f"P-Tuning via peft ({P_TUNING_TOKENS} virtual tokens, MLP prompt encoder)",
    partial(PromptEncoderConfig, task_type="CAUSAL_LM", num_virtual_tokens=P_TUNING_TOKENS),
    _load_prepending)
PREFIX_TUNING = _method(
    "prefix-tuning", f"Prefix Tuning via peft ({PREFIX_TUNING_TOKENS} virtual keys/values a layer)",
    partial(PrefixTuningConfig, task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_TUNING_TOKENS),
    load_peft)
