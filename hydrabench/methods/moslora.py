"""`moslora`: Mixture-of-Subspaces LoRA (Wu et al., 2024, arXiv 2406.11909; code:
wutaiqiang/MoSLoRA). Between LoRA's down and up projections a learnable r x r mixer M fuses the
rank-one subspaces::

    y = W x + (alpha / r) * B M A dropout(x),    delta W = (alpha / r) * B M A

M = I is LoRA. As the reference code (its peft fork, `lora_AB`): A and M start Kaiming-uniform
(a = sqrt(5), `nn.Linear`'s default), B at zero, so the adapted model is the base model at
initialisation; A, M and B all train.

Merge status: exact. B M A is a product of fixed matrices, so the trained adapter is the plain
LoRA (A' = M A, B): `save` writes that LoRA as peft's own adapter, and loading, merging, export
and vLLM serving (merged weights, or vLLM's LoRA serving) are LoRA's, unchanged. %Param counts
M: r (in + out) + r^2 per adapted layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import get_peft_model
from torch import nn

from hydrabench.config.spec import RunSpec
from hydrabench.data.records import InstructionRecord
from hydrabench.methods.api import Method
from hydrabench.methods.lora import load_peft, lora_config, merge_peft

ADAPTER = "default"  # peft's adapter name


class MixedDown(nn.Module):
    """LoRA's down projection A followed by MoSLoRA's mixer M: x -> M A x.

    It stands in peft's `lora_A` slot; `weight` (M A, as peft's merge and dtype casts read it)
    makes peft's LoRA layer compute, and merge, B M A.
    """

    def __init__(self, down: nn.Linear) -> None:
        super().__init__()
        self.down = down
        rank = down.out_features
        # nn.Linear's default init is the reference's kaiming_uniform_(a=sqrt(5))
        self.mixer = nn.Linear(rank, rank, bias=False, device=down.weight.device,
                               dtype=down.weight.dtype)
        self.mixer.requires_grad_(down.weight.requires_grad)

    @property
    def weight(self) -> torch.Tensor:
        return self.mixer.weight @ self.down.weight

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixer(self.down(x))


def mixed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers whose down projection carries a mixer, by module path."""
    return {name: module for name, module in model.named_modules()
            if isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and ADAPTER in module.lora_A and isinstance(module.lora_A[ADAPTER], MixedDown)}


def _adapt(model: nn.Module, spec: RunSpec, records: Sequence[InstructionRecord]) -> nn.Module:
    peft_model = get_peft_model(model, lora_config(spec.adapter))
    for module in list(peft_model.modules()):
        slots = getattr(module, "lora_A", None)
        if isinstance(slots, nn.ModuleDict) and isinstance(slots[ADAPTER], nn.Linear):
            slots[ADAPTER] = MixedDown(slots[ADAPTER])
    return peft_model


@contextmanager
def folded(model: nn.Module) -> Iterator[None]:
    """Inside the block each mixer is folded into its down projection (a plain `nn.Linear` of
    weight M A in peft's slot): the model is the equal plain LoRA; the mixers come back after."""
    layers = mixed_layers(model)
    mixed = {path: layer.lora_A[ADAPTER] for path, layer in layers.items()}
    for path, layer in layers.items():
        down = mixed[path].down
        plain = nn.Linear(down.in_features, down.out_features, bias=False,
                          device=down.weight.device, dtype=down.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(mixed[path].weight)
        layer.lora_A[ADAPTER] = plain
    try:
        yield
    finally:
        for path, layer in layers.items():
            layer.lora_A[ADAPTER] = mixed[path]


def save_moslora(model: nn.Module, directory: Path) -> None:
    """peft's LoRA adapter of A' = M A and B: what LoRA's load, merge and serving read."""
    with folded(model):
        model.save_pretrained(directory)


METHOD = Method(name="moslora", description="MoSLoRA: LoRA with a learnable r x r mixer between "
                "A and B (B M A); merges exactly", adapt=_adapt, save=save_moslora,
                load=load_peft, merge=merge_peft)
