"""What a fine-tuning method gives the harness; each method is one module with one `METHOD`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from hydrabench.data.records import InstructionRecord
from hydrabench.models import BaseModel
from hydrabench.spec import RunSpec
from hydrabench.train import LossFn, StepCallback


class TrainFn(Protocol):
    """The shared training loop bound to a run: train `model` on `records`, return a summary;
    `loss` scores records the way training does (LoraHub's weight search)."""

    base: BaseModel  # the base model and its tokenizer

    def __call__(self, model: torch.nn.Module, records: Sequence[InstructionRecord], *,
                 tag: str = "", max_steps: int | None = None) -> dict: ...

    def loss(self, model: torch.nn.Module, records: Sequence[InstructionRecord]) -> float: ...


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    # adapt(base_model, spec, training_records) -> the model to train (None: no training at all)
    adapt: Callable[[torch.nn.Module, RunSpec, Sequence[InstructionRecord]],
                    torch.nn.Module] | None
    save: Callable[[torch.nn.Module, Path], None]
    load: Callable[[torch.nn.Module, Path], torch.nn.Module]
    # merge(model) -> a plain transformers model for export; None: no exact merge (served by hf,
    # or by hydrabench's vLLM plugin where it covers the method)
    merge: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    # fit overrides the default "train everything trainable on all records" (LoRA-Split)
    fit: Callable[[torch.nn.Module, RunSpec, Sequence[InstructionRecord], TrainFn],
                  dict] | None = None
    # step_callback(model, step) after each optimizer update, gradients still set (AdaLoRA)
    step_callback: StepCallback | None = None
    # loss_fn(spec) -> the training loss to use instead of the LM loss, or None (HydraLoRA balance)
    loss_fn: Callable[[RunSpec], LossFn | None] | None = None
    # check(spec, training records) before any work: raise SpecError on records the method cannot
    # train on (LoRA-Split's per-component adapters need a record per component)
    check: Callable[[RunSpec, Sequence[InstructionRecord]], None] | None = None
    # adapter settings the method brings, over the profile's and under the user's flags
    adapter_defaults: Mapping[str, object] = field(default_factory=dict)

    @property
    def mergeable(self) -> bool:
        return self.merge is not None


def default_fit(model: torch.nn.Module, spec: RunSpec, records: Sequence[InstructionRecord],
                train_fn: TrainFn) -> dict:
    return train_fn(model, records)
