"""`r-lora`: R-LoRA (Liu, Chang and Wu, 2025, arXiv 2502.15455; code: jinda-liu/R-LoRA),
HydraLoRA's layer (shared A, N heads B_i, per-token softmax router) with multi-head
randomization::

    y = W x + (alpha / r) * sum_i g_i(x) * B_i dropout_i(A x),    g(x) = softmax(R x)

- Multi-head random initialisation: every head B_i is drawn independently, so the heads start
  apart (HydraLoRA's start them all at zero, the same). Scale, as its code's defaults
  (fine-tuning.sh: `lora_B_init unit`, `init_scale stable`, `stable_gamma 64`, reinit.py):
  B_i ~ N(0, 1/out) · r^(1/4) / sqrt(64). Its code applies the `stable` factor inside the loop
  over heads (head i gets it N - i times, an indentation slip); here every head gets it once.
- Multi-head dropout: an independent dropout mask per head on A x (its peft fork's
  `lora_B{i}(lora_dropout(lora_A(x)))`), the layer's `head_dropout` option.

Where it departs from its code: A and the router keep HydraLoRA's init and the scaling stays
alpha / r (the code also redraws A and uses alpha / sqrt(r)), so the row differs from HydraLoRA
in the two randomizations only; and W stays the frozen base weight: the code subtracts
(alpha / r) · mean_i B_i A from W so that the start equals the base model under a uniform gate,
which would make the artifact a new base checkpoint. Here the initial model is the base model
plus that small random update.

HydraLoRA's optional balance loss (`--balance-loss-coef`, off by default) applies as there.

Merge status: none (the gate depends on every token). The trained adapter is HydraLoRA's format
(evaluation has no dropout), so hydrabench's vLLM plugin serves it unmerged as HydraLoRA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from hydrabench.config.spec import RunSpec
from hydrabench.data.records import InstructionRecord
from hydrabench.methods.hydralora import HeadedAdapter, balanced_loss, make_method
from hydrabench.methods.hydralora_layer import HydraLoraConfig, hydralora_layers

STABLE_GAMMA = 64  # the code's stable_gamma


def head_init_std(out_features: int, rank: int) -> float:
    """The standard deviation of every B_i entry: `unit` N(0, 1/out) times r^(1/4)/sqrt(gamma)."""
    return out_features ** -0.5 * rank ** 0.25 / math.sqrt(STABLE_GAMMA)


@dataclass(frozen=True)
class RandomizedHeads(HeadedAdapter):
    """HydraLoRA's adapter with a dropout mask per head and the heads B_i drawn at random."""

    def config(self, spec: RunSpec, records: Sequence[InstructionRecord]) -> HydraLoraConfig:
        return replace(super().config(spec, records), head_dropout=True)

    def adapt(self, model: nn.Module, spec: RunSpec,
              records: Sequence[InstructionRecord]) -> nn.Module:
        model = super().adapt(model, spec, records)
        with torch.no_grad():
            for layer in hydralora_layers(model).values():
                layer.lora_B.normal_(0.0, head_init_std(layer.out_features, layer.r))
        return model


METHOD = make_method("r-lora", "R-LoRA: HydraLoRA with heads B_i drawn at random and a "
                     "dropout mask per head", RandomizedHeads(), loss_fn=balanced_loss)
