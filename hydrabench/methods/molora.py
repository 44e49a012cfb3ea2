"""`molora`: a mixture of N whole LoRA experts with top-k routing, as MoLoRA (Zadouri et al.,
2023, arXiv 2309.05444) and MixLoRA (Li et al., 2024, arXiv 2404.15159; code: TUDB-Labs/MoE-PEFT,
`moe_peft/adapters/mixlora`). For an adapted linear layer with frozen weight W::

    p(x) = softmax(W_g x)                          (float32, as MixLoRA's gate)
    S(x) = the k largest p_i(x)
    y = W x + (alpha / r) * sum_{i in S(x)} (p_i(x) / sum_{j in S(x)} p_j(x)) * B_i A_i dropout(x)

k = N is the dense mixture. The experts are HydraLoRA's layer without the shared A (each its
own A_i, Kaiming-uniform, and B_i, zero: the adapted model is the base model at initialisation);
the router W_g starts N(0, 0.02^2), MixLoRA's `router_init_range`. Defaults are MixLoRA's
template: top-2 (`--top-k`); N is the spec's `num_heads` (MixLoRA's template has 8).

Balance loss, Switch Transformer style as MixLoRA's `_mixtral_load_balancing_loss_func`:
over the non-padding tokens of every routed layer pooled (MixLoRA concatenates its layers'
router logits), f_i = the share of tokens whose top-k holds expert i, P_i = the mean of p_i; the
term N · sum_i f_i · P_i (k when perfectly balanced), times `balance_loss_coef` (0.01 here, the
MixLoRA paper's; MoE-PEFT's config falls back to 0.001), is added to the LM loss.

Where it departs from MixLoRA: MixLoRA routes once per FFN block and its experts are the whole
LoRA-adapted FFN; here, as MoLoRA, every adapted linear layer routes its own experts, so the
method takes the spec's target modules like the rest of the table. All experts are computed and
the unselected weighted by zero (the same numbers as a sparse dispatch, not its speed).

%Param as MoLoRA and MixLoRA count it: the total is the N experts (N · r (in + out) per
layer; the router, N · in, reported apart as for HydraLoRA); the activated parameters, what one
token's forward uses, are k of the N experts (k · r (in + out)), the record's
`percent_param_active`.

Saved as HydraLoRA's adapter with `method: molora` and `top_k` in its adapter_config.json
(artifacts written before that say `method: hydralora` and keep top_k in molora.json beside it;
both load).

Merge status: none (the gate depends on every token). Served unmerged by hydrabench's vLLM plugin
(its softmax gate with top_k renormalised), exactly as hf.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from hydrabench.config.spec import RunSpec
from hydrabench.data.records import InstructionRecord
from hydrabench.errors import SpecError
from hydrabench.methods.api import Method
from hydrabench.methods.hydralora import HeadedAdapter, auto_head_choice
from hydrabench.methods.hydralora_layer import (
    ADAPTER_CONFIG_NAME,
    HydraLoraConfig,
    HydraLoraLinear,
    apply_hydralora,
    base_layers_in_place,
    hydralora_layers,
    load_hydralora,
    load_hydralora_tensors,
    recording_gates,
    router_parameters,
    save_hydralora,
)
from hydrabench.training.loop import LossFn

TOP_K = 2  # MixLoRA's template
BALANCE_COEF = 0.01  # MixLoRA's router_aux_loss_coef
ROUTER_INIT_STD = 0.02  # MixLoRA's router_init_range
# Where artifacts written before molora was served by the plugin keep top_k (their
# adapter_config.json is plain HydraLoRA's); new ones hold it in adapter_config.json.
LEGACY_MOLORA_CONFIG = "molora.json"


class MoLoraLinear(HydraLoraLinear):
    """HydraLoRA's layer with one A per expert and a top-k renormalised softmax gate.

    While gates are recorded, `last_probs` keeps the full float32 softmax (for the balance loss).
    """

    def __init__(self, layer: HydraLoraLinear, top_k: int) -> None:
        if layer.shared_a or layer.router is None:
            raise ValueError("MoLoRA's experts need one A each and a softmax router")
        if not 1 <= top_k <= layer.num_heads:
            raise ValueError(f"top_k must be in [1, {layer.num_heads}], got {top_k}")
        super().__init__(layer.base, layer.r, layer.num_heads, layer.scaling * layer.r,
                         getattr(layer.dropout, "p", 0.0), shared_a=False)
        self.load_state_dict(layer.state_dict())  # the same experts and router, same format
        self.train(layer.training)
        self.top_k = top_k
        self.last_probs: torch.Tensor | None = None

    def compute_gate(self, x: torch.Tensor) -> torch.Tensor:
        probs = super().compute_gate(x)  # float32 softmax over the N experts
        if self.record_gates:
            self.last_probs = probs
        top, chosen = probs.topk(self.top_k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, chosen, top / top.sum(-1, keepdim=True))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}"


def molora_layers(model: nn.Module) -> dict[str, MoLoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MoLoraLinear)}


def _to_molora(model: nn.Module, top_k: int) -> nn.Module:
    for path, layer in hydralora_layers(model).items():
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, MoLoraLinear(layer, top_k))
    return model


def experts(spec: RunSpec, records: Sequence[InstructionRecord]) -> int:
    """N: the spec's number of heads (an `auto` N chosen on the records)."""
    heads = spec.adapter.num_heads
    return auto_head_choice(records, spec.seed)["num_heads"] if heads == "auto" else heads


def _top_k(spec: RunSpec) -> int:
    return spec.adapter.top_k if spec.adapter.top_k is not None else TOP_K


def _check(spec: RunSpec, records: Sequence[InstructionRecord]) -> None:
    n, k = experts(spec, records), _top_k(spec)
    if k > n:
        raise SpecError(f"molora: top_k ({k}) must be at most the number of experts "
                        f"(num_heads {n})")


EXPERTS = HeadedAdapter(shared_a=False)


def _adapt(model: nn.Module, spec: RunSpec, records: Sequence[InstructionRecord]) -> nn.Module:
    _to_molora(EXPERTS.adapt(model, spec, records), _top_k(spec))
    with torch.no_grad():
        for layer in molora_layers(model).values():
            layer.router.weight.normal_(0.0, ROUTER_INIT_STD)
    return model


def _save(model: nn.Module, directory: Path) -> None:
    (top_k,) = {layer.top_k for layer in molora_layers(model).values()}
    save_hydralora(model, directory, {"method": "molora", "top_k": top_k})


def _load(model: nn.Module, directory: Path) -> nn.Module:
    meta = json.loads((Path(directory) / ADAPTER_CONFIG_NAME).read_text())
    if meta.get("method") == "hydralora":  # a legacy artifact: top_k in molora.json
        top_k = json.loads((Path(directory) / LEGACY_MOLORA_CONFIG).read_text())["top_k"]
        return _to_molora(load_hydralora(model, directory), top_k)
    if meta.get("method") != "molora":
        raise ValueError(f"{Path(directory) / ADAPTER_CONFIG_NAME} is not a MoLoRA adapter: "
                         f"method {meta.get('method')!r}")
    config = HydraLoraConfig.from_dict({k: v for k, v in meta.items() if k != "top_k"})
    return load_hydralora_tensors(_to_molora(apply_hydralora(model, config), meta["top_k"]),
                                  directory)


def active_parameters(model: nn.Module) -> int:
    """The expert parameters one token uses: k of each layer's N equal experts."""
    return sum((layer.lora_A.weight.numel() + layer.lora_B.numel()) * layer.top_k
               // layer.num_heads for layer in molora_layers(model).values())


def switch_balance_loss(model: nn.Module, mask: torch.Tensor | None) -> torch.Tensor:
    """N · sum_i f_i · P_i over the non-padding tokens of every MoLoRA layer pooled (from the
    gates of the last forward, run inside `recording_gates`)."""
    probs = []
    for layer in molora_layers(model).values():
        p = layer.last_probs
        probs.append(p[mask.to(p.device, torch.bool)] if mask is not None else
                     p.reshape(-1, p.shape[-1]))
    if not probs:
        raise RuntimeError("no recorded gates: run the forward inside recording_gates(model)")
    pooled = torch.cat(probs)  # [tokens of all layers, N]
    n = pooled.shape[-1]
    k = next(iter(molora_layers(model).values())).top_k
    chosen = torch.zeros_like(pooled).scatter(-1, pooled.topk(k, dim=-1).indices, 1.0)
    return n * (chosen.mean(dim=0) * pooled.mean(dim=0)).sum()


def balanced_loss(spec: RunSpec) -> LossFn | None:
    """LM loss + balance_loss_coef · the Switch balance loss (None: the coefficient is 0)."""
    coef = spec.adapter.balance_loss_coef
    if coef == 0:
        return None

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        try:
            with recording_gates(model):
                lm_loss = model(**batch).loss
                return lm_loss + coef * switch_balance_loss(model, batch.get("attention_mask"))
        finally:  # the probabilities would pin this batch's activations
            for layer in molora_layers(model).values():
                layer.last_probs = None

    return loss


METHOD = Method(
    name="molora", description="MoLoRA/MixLoRA: N LoRA experts, top-k softmax router "
    "(renormalised), Switch balance loss", adapt=_adapt, save=_save, load=_load, merge=None,
    fit=EXPERTS.fit, loss_fn=balanced_loss, check=_check, router_parameters=router_parameters,
    active_parameters=active_parameters, base_layers_in_place=base_layers_in_place,
    adapter_defaults={"top_k": TOP_K, "balance_loss_coef": BALANCE_COEF})
