"""`hydralora` and `hydralora-uniform`: the registry entries on HydraLoRA's layer
(hydrabench/methods/hydralora_layer.py, whose names this module also exports), and the
`HeadedAdapter` that lora-split and loramoe build theirs from.

N is an int or `auto`: the elbow of TF-IDF k-means over the training records, the paper's way.
The fit's training summary says which N was trained (`num_heads`) and how an `auto` N was chosen
(`head_choice`, None for a fixed N).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from hydrabench.config.spec import RunSpec
from hydrabench.data.clustering import choose_num_clusters
from hydrabench.data.records import InstructionRecord
from hydrabench.methods.api import ApproximateMerge, Method, TrainFn
from hydrabench.methods.hydralora_layer import (
    HydraLoraConfig,
    apply_hydralora,
    base_layers_in_place,
    load_balancing_loss,
    load_hydralora,
    mean_router_gates,
    merge_hydralora,
    recording_gates,
    router_parameters,
    save_hydralora,
)
from hydrabench.training.loop import LossFn


@lru_cache(maxsize=1)
def _clustering_elbow(texts: tuple[str, ...], seed: int) -> tuple[int, tuple[float, ...]]:
    heads, inertias = choose_num_clusters(list(texts), k_min=1, k_max=8, seed=seed)
    return heads, tuple(inertias)


def auto_head_choice(records: Sequence[InstructionRecord], seed: int) -> dict[str, object]:
    """N for `num_heads: auto`: the elbow of TF-IDF k-means (k = 1..8) over the records' texts.
    Memoised on the texts and seed, so adapt (which builds N heads) and fit (which records how N
    was chosen) cluster the corpus once."""
    heads, inertias = _clustering_elbow(tuple(r.instruction + " " + r.input for r in records),
                                        seed)
    return {"num_heads": heads, "inertias": list(inertias), "rule": "k-means elbow on TF-IDF"}


def spec_num_heads(spec: RunSpec) -> int | str:
    return spec.adapter.num_heads


@dataclass(frozen=True)
class HeadedAdapter:
    """adapt and fit of a method on HydraLoRA's layer: `heads(spec)` heads (an int, or "auto"),
    the layer's `gate` and `shared_a`."""

    heads: Callable[[RunSpec], int | str] = spec_num_heads
    gate: str = "softmax"
    shared_a: bool = True

    def head_choice(self, spec: RunSpec,
                    records: Sequence[InstructionRecord]) -> dict[str, object] | None:
        """How N was chosen on `records`; None when the spec fixes it."""
        return auto_head_choice(records, spec.seed) if self.heads(spec) == "auto" else None

    def config(self, spec: RunSpec, records: Sequence[InstructionRecord]) -> HydraLoraConfig:
        choice = self.head_choice(spec, records)
        return HydraLoraConfig(r=spec.adapter.rank,
                               num_heads=choice["num_heads"] if choice else self.heads(spec),
                               alpha=spec.adapter.alpha, dropout=spec.adapter.dropout,
                               target_modules=spec.adapter.target_modules, gate=self.gate,
                               shared_a=self.shared_a, base_model_id=spec.model)

    def adapt(self, model: nn.Module, spec: RunSpec,
              records: Sequence[InstructionRecord]) -> nn.Module:
        """Wrap the spec's target modules with HydraLoRA layers of this adapter's heads."""
        return apply_hydralora(model, self.config(spec, records))

    def fit(self, model: nn.Module, spec: RunSpec, records: Sequence[InstructionRecord],
            train_fn: TrainFn) -> dict:
        """The shared training loop on every record, its summary with the heads trained."""
        return {**train_fn(model, records), "num_heads": model.hydralora_config.num_heads,
                "head_choice": self.head_choice(spec, records)}


def balanced_loss(spec: RunSpec) -> LossFn | None:
    """LM loss + coef · load-balancing loss when the spec turns it on (off by default)."""
    coef = spec.adapter.balance_loss_coef
    if coef == 0:
        return None

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with recording_gates(model):
            lm_loss = model(**batch).loss
            return lm_loss + coef * load_balancing_loss(model, batch.get("attention_mask"))

    return loss


# The gate depends on every token, so no merge is exact: two approximations, export options
# measured against the exact model (--merge-gap). uniform: g = 1/N; router-mean: the router's
# gate averaged over the prompts of the run's evaluated tasks.
APPROXIMATE_MERGES: Mapping[str, ApproximateMerge] = {
    "uniform": lambda model, prompts: merge_hydralora(model, "uniform"),
    "router-mean": lambda model, prompts: merge_hydralora(model,
                                                          mean_router_gates(model, prompts())),
}


def make_method(name: str, description: str, adapter: HeadedAdapter, *,
                loss_fn: Callable[[RunSpec], LossFn | None] | None = None,
                fit: Callable[[nn.Module, RunSpec, Sequence[InstructionRecord], TrainFn],
                              dict] | None = None,
                **fields: object) -> Method:
    """A registry entry on HydraLoRA's layer (`fit`: the adapter's unless given); `fields` are
    further `Method` fields."""
    # No exact merge: served exactly by hf, or by the vLLM plugin (hydrabench/serving/plugin)
    # from the base checkpoint plus the adapter.
    return Method(name=name, description=description, adapt=adapter.adapt, save=save_hydralora,
                  load=load_hydralora, merge=None, fit=fit or adapter.fit, loss_fn=loss_fn,
                  approximate_merges=APPROXIMATE_MERGES, router_parameters=router_parameters,
                  base_layers_in_place=base_layers_in_place, **fields)


METHOD = make_method("hydralora", "HydraLoRA: shared A, N B heads, per-token softmax router",
                     HeadedAdapter(), loss_fn=balanced_loss)
UNIFORM_GATE_METHOD = make_method(
    "hydralora-uniform", "HydraLoRA without gate (g = 1/N), the paper's Fig. 6 ablation",
    HeadedAdapter(gate="uniform"))
