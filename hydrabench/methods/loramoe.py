"""`loramoe`: LoRAMoE (Dou et al., 2023, arXiv 2312.09979; code: Ablustrund/LoRAMoE) as its
paper defines it: N LoRA experts, each with its own A and B, mixed per token by a dense softmax
router — HydraLoRA's layer without the shared A — in the feed-forward layers, trained with the
localized balancing constraint.

Placement: the experts sit in the FFN (`gate_proj`, `up_proj`, `down_proj`, as LoRAMoE's
run_loramoe.sh), whatever the profile's targets, unless `--target-modules` says otherwise.

Localized balancing constraint, as in its code (peft/tuners/lora.py, `Linear.forward`): per
adapted layer, the importance Q[m, i] = sum over the tokens of sample m of the gate of expert i;
the first N/2 experts form the world-knowledge group, the others the task group; Z = Ω ∘ Q with
Ω[m, i] = 1 + blc_alpha when expert i's group is sample m's type, else 1 - blc_alpha; the term is
blc_weight · CV²(Z) = blc_weight · var(Z) / (mean(Z)² + 1e-10) (unbiased variance over all of Z),
summed over the adapted layers and added to the LM loss. The paper prints the term as
σ²(Z)/μ(Z); hydrabench follows the code. A sample's type is world knowledge (1) when its record's
component is in `blc_knowledge` (LoRAMoE's data marks it as `task_type`, which hydrabench reads as
the component), else 0. Padding tokens are left out of Q (the reference trains at batch size 1,
so it never has any). With an odd N the first group has N // 2 experts (the code needs an even N).

hydrabench turns the constraint on with blc_weight = blc_alpha = 0.1 (`--blc-weight`,
`--blc-alpha`; both are in the spec, hence the record); the published run_loramoe.sh sets both
to 0, which turns it off. N is the spec's `num_heads` (`auto` included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hydrabench.config.spec import RunSpec
from hydrabench.data.records import InstructionRecord
from hydrabench.methods.api import TrainFn
from hydrabench.methods.hydralora import HeadedAdapter, make_method
from hydrabench.methods.hydralora_layer import recording_gates
from hydrabench.training.loop import LossFn, encode_record

FFN = ("gate_proj", "up_proj", "down_proj")
EXPERTS = HeadedAdapter(shared_a=False)  # the spec's N, each expert its own A
CV_EPS = 1e-10  # the reference code's cv_squared epsilon


def localized_balancing_term(gate: torch.Tensor, mask: torch.Tensor | None,
                             knowledge: torch.Tensor, alpha: float) -> torch.Tensor:
    """CV² of Z = Ω ∘ Q for one layer's gates `gate` [samples, tokens, N] (before blc_weight);
    `knowledge` [samples] is True for world-knowledge samples, `mask` [samples, tokens] drops
    padding."""
    if mask is not None:
        gate = gate * mask.to(gate.dtype).unsqueeze(-1)
    importance = gate.float().sum(dim=1)  # Q: [samples, N]
    experts = importance.shape[-1]
    knowledge_expert = torch.arange(experts, device=gate.device) < experts // 2
    same_type = knowledge_expert.unsqueeze(0) == knowledge.to(gate.device).unsqueeze(1)
    z = (importance * torch.where(same_type, 1.0 + alpha, 1.0 - alpha)).flatten()
    if z.numel() == 1:
        return z.new_zeros(())
    return z.var() / (z.mean().square() + CV_EPS)


def _knowledge_sequences(model: nn.Module) -> frozenset[tuple[int, ...]]:
    return next(m.loramoe_knowledge for m in model.modules() if hasattr(m, "loramoe_knowledge"))


def localized_balanced_loss(spec: RunSpec) -> LossFn | None:
    """LM loss + blc_weight · Σ_layers CV²(Ω ∘ Q) when the spec turns the constraint on."""
    weight, alpha = spec.adapter.blc_weight, spec.adapter.blc_alpha
    if weight == 0:
        return None

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        knowledge_ids = _knowledge_sequences(model)
        knowledge = torch.tensor([tuple(ids[row.bool()].tolist()) in knowledge_ids
                                  for ids, row in zip(batch["input_ids"], mask, strict=True)])
        with recording_gates(model) as layers:
            lm_loss = model(**batch).loss
            terms = [localized_balancing_term(layer.last_gate, mask, knowledge, alpha)
                     for layer in layers.values()]
        return lm_loss + weight * torch.stack(terms).sum()

    return loss


def _fit(model: nn.Module, spec: RunSpec, records: Sequence[InstructionRecord],
         train_fn: TrainFn) -> dict:
    # Training batches hold token ids only: a sample's type is found by its ids.
    knowledge = [r for r in records if r.component in spec.adapter.blc_knowledge]
    model.loramoe_knowledge = frozenset(
        tuple(encode_record(train_fn.base.tokenizer, r, spec.prompt_template,
                            spec.train.seq_len)[0]) for r in knowledge)
    return {**EXPERTS.fit(model, spec, records, train_fn),
            "knowledge_records": len(knowledge)}


METHOD = make_method(
    "loramoe", "LoRAMoE: N LoRA experts (own A and B) in the FFN, per-token softmax router, "
    "localized balancing constraint", EXPERTS, loss_fn=localized_balanced_loss, fit=_fit,
    adapter_defaults={"target_modules": FFN, "blc_weight": 0.1, "blc_alpha": 0.1})
