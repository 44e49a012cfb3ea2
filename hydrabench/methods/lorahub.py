"""`lorahub`: LoraHub (Huang et al., 2023, arXiv 2307.13269): n upstream LoRAs composed into one.

The upstream LoRAs are `lora-split-sum`'s before their sum: adapter k of rank r trained on
component k of the corpus. LoraHub then searches, gradient-free with nevergrad's NGOpt as its
reference code does, weights w in [-1.5, 1.5]^n for the element-wise composition
A = sum_i w_i A_i, B = sum_i w_i B_i that minimise the loss on a few examples plus
0.05 * mean |w|. The result is one rank-r LoRA, mergeable like any other.

LoraHub draws its few examples from the downstream task. hydrabench trains once per corpus and
scores every column of a table with that training, so the examples are a seeded sample of the
corpus (5 per upstream LoRA); the weights and the search's best objective go into the record.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import nevergrad as ng
import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from hydrabench.config.spec import RunSpec
from hydrabench.data.records import InstructionRecord
from hydrabench.methods.api import Method, TrainFn
from hydrabench.methods.lora import lora_config, merge_peft
from hydrabench.methods.lora_split import (
    COMBINED,
    adapt_splits,
    check_splits,
    load_combined,
    save_combined,
    train_splits,
)

EXAMPLES_PER_MODULE = 5
SEARCH_BUDGET = 40  # LoraHub's default number of inference steps
WEIGHT_BOUND = 1.5
L1_COEF = 0.05


def compose(model: torch.nn.Module, states: Sequence[dict[str, torch.Tensor]],
            weights: Sequence[float]) -> None:
    """Write sum_i w_i * (A_i, B_i) of the upstream adapters' state dicts into the combined
    adapter."""
    combined = {key: sum(w * state[key] for w, state in zip(weights, states, strict=True))
                for key in states[0]}
    set_peft_model_state_dict(model, combined, adapter_name=COMBINED)


def _fit(model: torch.nn.Module, spec: RunSpec, records: Sequence[InstructionRecord],
         train_fn: TrainFn) -> dict:
    names, summary = train_splits(model, spec, records, train_fn)
    examples = random.Random(spec.seed).sample(
        list(records), min(len(records), EXAMPLES_PER_MODULE * len(names)))
    states = [get_peft_model_state_dict(model, adapter_name=name) for name in names]
    model.add_adapter(COMBINED, lora_config(spec.adapter))
    model.set_adapter(COMBINED)

    def objective(weights: list[float]) -> float:
        compose(model, states, weights)
        return train_fn.loss(model, examples) + L1_COEF * sum(map(abs, weights)) / len(weights)

    weights = ng.p.Array(init=[0.0] * len(names), lower=-WEIGHT_BOUND, upper=WEIGHT_BOUND)
    weights.random_state = np.random.RandomState(spec.seed)  # a reproducible search
    best = [float(w) for w in
            ng.optimizers.NGOpt(parametrization=weights, budget=SEARCH_BUDGET).minimize(
                objective).value]
    best_objective = objective(best)  # also leaves the best composition in place
    for name in names:
        model.delete_adapter(name)
    return {**summary, "weights": best, "objective": best_objective,
            "few_shot_examples": len(examples), "search_budget": SEARCH_BUDGET}


METHOD = Method(name="lorahub",
                description="LoraHub: n upstream LoRAs composed by a gradient-free weight search",
                adapt=adapt_splits, save=save_combined, load=load_combined, merge=merge_peft,
                fit=_fit, check=check_splits)
