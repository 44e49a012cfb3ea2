"""`loramoe`: LoRAMoE (Dou et al., 2023, arXiv 2312.09979), N LoRA experts, each with its own A
and B, mixed per token by a dense softmax router: HydraLoRA's layer without the shared A.

LoRAMoE puts its experts in the FFN layers (`--target-modules gate_proj,up_proj,down_proj` does
that); here they go where the profile puts every adapter, so a table compares structures at the
same placement. Its localized balancing constraint is not implemented; `--balance-loss-coef`
adds HydraLoRA's load-balancing loss instead. N is the spec's `num_heads` (`auto` included).
"""

from __future__ import annotations

from functools import partial

from hydrabench.methods.hydralora import adapt, balanced_loss, fit_recording_heads, make_method

METHOD = make_method("loramoe", "LoRAMoE: N LoRA experts (own A and B), per-token softmax router",
                     partial(adapt, shared_a=False), fit_recording_heads, balanced_loss)
