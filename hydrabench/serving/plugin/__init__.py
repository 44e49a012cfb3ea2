"""hydrabench's vLLM plugin: HydraLoRA-family adapters served exactly, per token, by vLLM.

HydraLoRA's gate depends on every token, so no merged checkpoint is exact. This plugin registers
variants of vLLM's own Llama and Qwen2 models (`HydraLoraLlamaForCausalLM`,
`HydraLoraQwen2ForCausalLM`) that compute, on top of vLLM's parallel linear layers, the project's
layer (`hydrabench.methods.hydralora_layer.HydraLoraLinear`): shared A or one A per head, router
logits and softmax in float32 (or the uniform gate), scaling alpha / r. It serves hydralora,
hydralora-uniform, loramoe, lora-split and r-lora artifacts (HydraLoRA's format), molora's (that
layer with the softmax's top k renormalised) and flylora's (r heads of rank 1, no router: the 0/1
top-k mask of A·x + d); `adapter_terms` reads each format in the plugin's terms.

vLLM calls `register` in every process it starts: the `vllm.general_plugins` entry point in
pyproject.toml. This module imports nothing from vLLM at import time; the model classes live in
`hydrabench.serving.plugin.models`, imported by vLLM only when a checkpoint names them.

A servable export (`hydrabench export RUN --merge exact`) is the base checkpoint, its config.json's
`architectures` naming the plugin class and its `model_type` hydrabench's export type (which plain
transformers refuses: hydrabench.models.exports), plus the adapter as the project saves it in the
`hydralora/` subdirectory (adapter_config.json, adapter_model.safetensors).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# The base model's architecture -> the plugin class that serves it with a HydraLoRA adapter.
PLUGIN_ARCHITECTURES = {"LlamaForCausalLM": "HydraLoraLlamaForCausalLM",
                        "Qwen2ForCausalLM": "HydraLoraQwen2ForCausalLM"}
ADAPTER_DIR = "hydralora"
# A target module of the HF model -> (the vLLM layer it lives in, its shard of that layer's
# output). vLLM fuses q/k/v into qkv_proj and gate/up into gate_up_proj; None: not fused.
TARGETS: dict[str, tuple[str, int | None]] = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", None),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", None),
}
# Tensor-parallel sizes whose sharding has been checked against the hf exact model (the CPU
# build here: 2 worker processes, every target module, k/v heads split rather than replicated);
# the plugin refuses others rather than risk a silently wrong answer.
VERIFIED_TENSOR_PARALLEL = (1, 2)


class PluginError(ValueError):
    """The plugin cannot serve this model or adapter exactly."""


def register() -> None:
    """The `vllm.general_plugins` entry point: make vLLM know the plugin's architectures, and
    transformers (which reads vLLM's configs) the exports' model types."""
    from vllm import ModelRegistry

    from hydrabench.models.exports import register_export_configs

    register_export_configs()
    for architecture in PLUGIN_ARCHITECTURES.values():
        ModelRegistry.register_model(architecture,
                                     f"hydrabench.serving.plugin.models:{architecture}")


def plugin_architecture(base_architectures: Sequence[str]) -> str:
    """The plugin class serving a base model with these `architectures` (from its config)."""
    covered = [PLUGIN_ARCHITECTURES[a] for a in base_architectures if a in PLUGIN_ARCHITECTURES]
    if len(base_architectures) != 1 or not covered:
        raise PluginError(f"architecture {', '.join(base_architectures) or '(none)'} is not "
                          f"covered by hydrabench's vLLM plugin (it covers "
                          f"{', '.join(PLUGIN_ARCHITECTURES)}); use --backend hf")
    return covered[0]


@dataclass(frozen=True)
class AdapterTerms:
    """An adapter as the plugin computes it, per target module and token::

        y = W x + sum_i (g_i(x) * scaling) B_i A_i x      N heads B_i, each of rank r

    A is shared or one A_i per head; the gate g is `softmax` (of the router's logits, in
    float32; with `top_k`, its top k renormalised to sum 1), `uniform` (1/N) or `mask` (1 on the
    `top_k` largest A_i x + d_i, d a saved bias, else 0: FlyLoRA's rank-1 heads)."""

    r: int
    num_heads: int
    scaling: float
    shared_a: bool
    gate: str
    top_k: int | None
    target_modules: tuple[str, ...]


# adapter_config.json's `method` -> how the plugin reads it. "hydralora": HydraLoRA's layer
# (hydralora, hydralora-uniform, loramoe, lora-split, r-lora); "molora": that layer plus top_k;
# "flylora": FlyLoRA's layer.
ADAPTER_FORMATS = ("hydralora", "molora", "flylora")
GATES = ("softmax", "uniform", "mask")


def adapter_terms(config: dict) -> AdapterTerms:
    """The plugin's terms of a saved adapter config; PluginError for one it cannot compute."""
    form = config.get("method")  # the saved format, which several methods share
    if form not in ADAPTER_FORMATS:
        raise PluginError(f"not an adapter config hydrabench's vLLM plugin reads: method "
                          f"{form!r} (it reads {', '.join(ADAPTER_FORMATS)})")
    try:
        if form == "flylora":  # r rank-1 heads: A's rows are the heads, B's columns theirs
            terms = AdapterTerms(r=1, num_heads=int(config["r"]),
                                 scaling=config["alpha"] / config["r"], shared_a=False,
                                 gate="mask", top_k=int(config["k"]),
                                 target_modules=tuple(config["target_modules"]))
        else:
            top_k = config.get("top_k")
            terms = AdapterTerms(r=int(config["r"]), num_heads=int(config["num_heads"]),
                                 scaling=config["alpha"] / config["r"],
                                 shared_a=bool(config["shared_a"]), gate=config["gate"],
                                 top_k=None if top_k is None else int(top_k),
                                 target_modules=tuple(config["target_modules"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        raise PluginError(f"{form} adapter config: {type(err).__name__}: {err}") from None
    problems = []
    if terms.r < 1 or terms.num_heads < 1:
        problems.append(f"r and heads must be >= 1 (got {terms.r}, {terms.num_heads})")
    if terms.gate not in GATES or (form != "flylora" and terms.gate == "mask"):
        problems.append(f"gate {terms.gate!r}")
    if terms.top_k is not None and not 1 <= terms.top_k <= terms.num_heads:
        problems.append(f"top_k {terms.top_k} outside [1, {terms.num_heads}]")
    if terms.top_k is not None and form == "hydralora":  # hf loads no top_k from it
        problems.append("top_k in HydraLoRA's format (molora's holds it)")
    if terms.top_k is not None and terms.gate == "uniform":
        problems.append("top_k with the uniform gate")
    if form == "molora" and terms.shared_a:  # hf's MoLoraLinear refuses it too
        problems.append("a shared A (MoLoRA's experts hold one each)")
    if problems:
        raise PluginError(f"{form} adapter config not served by hydrabench's vLLM plugin: "
                          f"{'; '.join(problems)}")
    return terms


def check_adapter_config(config: dict, tensor_parallel_size: int = 1) -> AdapterTerms:
    """The adapter's terms; PluginError unless the plugin computes it exactly at this
    parallelism."""
    terms = adapter_terms(config)
    _check_targets(terms.target_modules, tensor_parallel_size)
    return terms


def _check_targets(target_modules: tuple[str, ...] | list[str],
                   tensor_parallel_size: int) -> None:
    uncovered = sorted(set(target_modules) - set(TARGETS))
    if uncovered:
        raise PluginError(f"target module(s) {', '.join(uncovered)} are not covered by "
                          f"hydrabench's vLLM plugin (it covers {', '.join(TARGETS)}); "
                          f"use --backend hf")
    if tensor_parallel_size not in VERIFIED_TENSOR_PARALLEL:
        raise PluginError(f"tensor_parallel_size {tensor_parallel_size} is not verified for "
                          f"hydrabench's vLLM plugin (verified: "
                          f"{', '.join(map(str, VERIFIED_TENSOR_PARALLEL))}); use "
                          f"tensor_parallel_size 1 or --backend hf")


def check_covered(base_architectures: Sequence[str], target_modules: list[str] | tuple[str, ...],
                  tensor_parallel_size: int) -> None:
    """Raise PluginError unless the plugin serves adapters on these targets of this base
    architecture exactly at this parallelism."""
    plugin_architecture(base_architectures)
    _check_targets(target_modules, tensor_parallel_size)


def read_adapter_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / ADAPTER_DIR / "adapter_config.json").read_text())


def is_plugin_export(model_dir: Path) -> bool:
    """A checkpoint whose config names a plugin architecture (a servable HydraLoRA export)."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(a in PLUGIN_ARCHITECTURES.values() for a in architectures)
