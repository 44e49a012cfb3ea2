"""What a fine-tuning method gives the harness; each method is one module with one `METHOD`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from hydrabench.config.spec import RunSpec
from hydrabench.data.records import InstructionRecord
from hydrabench.models import BaseModel
from hydrabench.training.loop import LossFn, StepCallback


class TrainFn(Protocol):
    """The shared training loop bound to a run: train `model` on `records`, return a summary;
    `loss` scores records the way training does (LoraHub's weight search)."""

    base: BaseModel  # the base model and its tokenizer

    def __call__(self, model: torch.nn.Module, records: Sequence[InstructionRecord], *,
                 tag: str = "", max_steps: int | None = None) -> dict: ...

    def loss(self, model: torch.nn.Module, records: Sequence[InstructionRecord]) -> float: ...


# merge(model, prompts) -> a plain transformers model approximating the adapted one; `prompts()`
# gives the tokenized prompts of the run's evaluated tasks, for a merge calibrated on them.
ApproximateMerge = Callable[[torch.nn.Module, Callable[[], list[Mapping[str, torch.Tensor]]]],
                            torch.nn.Module]


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
    # approximate merges by name (`export --merge NAME`; `--merge-gap` scores each against the
    # exact model), for a method with no exact merge (HydraLoRA's gate depends on every token)
    approximate_merges: Mapping[str, ApproximateMerge] = field(default_factory=dict)
    # router_parameters(model): how many of the parameters the method added route between its
    # adapters rather than adapt; reported apart from the paper's %Param. None: none do.
    router_parameters: Callable[[torch.nn.Module], int] | None = None
    # active_parameters(model): how many of the adapter parameters one token's forward uses, for
    # a method that selects per token (top-k experts, FlyLoRA's top-k ranks). None: all of them.
    active_parameters: Callable[[torch.nn.Module], int] | None = None
    # False: the method ignores the adapter's target modules and rank (base, full fine-tuning),
    # so they are not checked against the model
    adapts_target_modules: bool = True
    # base_layers_in_place(model): inside the block the adapted model is its base model again
    # (the wrapped modules back in place). hydrabench's vLLM plugin serves the method exactly
    # from that base checkpoint plus the saved artifact. None: the plugin does not serve it.
    base_layers_in_place: Callable[[torch.nn.Module],
                                   AbstractContextManager[object]] | None = None

    @property
    def mergeable(self) -> bool:
        return self.merge is not None

    @property
    def trains(self) -> bool:
        """Whether a run of the method trains (and leaves an artifact); the base model does not."""
        return self.adapt is not None

    @property
    def served_by_plugin(self) -> bool:
        return self.base_layers_in_place is not None

    def parameter_counts(self, model: torch.nn.Module, base_total: int) -> dict[str, Any]:
        """The paper's %Param of `model` (the base model of `base_total` parameters, adapted):
        adapter parameters / base parameters; the router reported apart. `active` (its %:
        percent_param_active) is what one token's forward uses of the adapter: all of it unless
        the method selects per token.

        Adapter parameters are those the method added less its router's; for full fine-tuning,
        which adds none, they are the trainable parameters (all of them).
        """
        params = list(model.parameters())  # deduplicates tied weights
        total = sum(p.numel() for p in params)
        router = self.router_parameters(model) if self.router_parameters else 0
        added = total - base_total
        trainable = sum(p.numel() for p in params if p.requires_grad)
        adapter = (added - router) if added > 0 else trainable
        active = self.active_parameters(model) if self.active_parameters else adapter
        return {"base": base_total, "total": total, "trainable": trainable, "adapter": adapter,
                "router": router, "active": active,
                "percent_param": 100.0 * adapter / base_total,
                "percent_param_with_router": 100.0 * (adapter + router) / base_total,
                "percent_param_active": 100.0 * active / base_total}


def default_fit(model: torch.nn.Module, spec: RunSpec, records: Sequence[InstructionRecord],
                train_fn: TrainFn) -> dict:
    return train_fn(model, records)
