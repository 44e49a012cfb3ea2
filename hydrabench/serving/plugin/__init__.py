"""hydrabench's vLLM plugin: HydraLoRA-family adapters served exactly, per token, by vLLM.

HydraLoRA's gate depends on every token, so no merged checkpoint is exact. This plugin registers
variants of vLLM's own Llama and Qwen2 models (`HydraLoraLlamaForCausalLM`,
`HydraLoraQwen2ForCausalLM`) that compute, on top of vLLM's parallel linear layers, the project's
layer (`hydrabench.methods.hydralora_layer.HydraLoraLinear`): shared A or one A per head, router
logits and softmax in float32 (or the uniform gate), scaling alpha / r. It serves hydralora,
hydralora-uniform, loramoe and lora-split artifacts.

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


def plugin_architecture(base_architectures: list[str]) -> str:
    """The plugin class serving a base model with these `architectures` (from its config)."""
    covered = [PLUGIN_ARCHITECTURES[a] for a in base_architectures if a in PLUGIN_ARCHITECTURES]
    if len(base_architectures) != 1 or not covered:
        raise PluginError(f"architecture {', '.join(base_architectures) or '(none)'} is not "
                          f"covered by hydrabench's vLLM plugin (it covers "
                          f"{', '.join(PLUGIN_ARCHITECTURES)}); use --backend hf")
    return covered[0]


def check_adapter_config(config: dict, tensor_parallel_size: int = 1) -> None:
    """Raise PluginError unless the plugin computes this adapter exactly at this parallelism."""
    if config.get("method") != "hydralora":
        raise PluginError(f"not a HydraLoRA adapter config: method {config.get('method')!r}")
    uncovered = sorted(set(config["target_modules"]) - set(TARGETS))
    if uncovered:
        raise PluginError(f"target module(s) {', '.join(uncovered)} are not covered by "
                          f"hydrabench's vLLM plugin (it covers {', '.join(TARGETS)}); "
                          f"use --backend hf")
    if tensor_parallel_size not in VERIFIED_TENSOR_PARALLEL:
        raise PluginError(f"tensor_parallel_size {tensor_parallel_size} is not verified for "
                          f"hydrabench's vLLM plugin (verified: "
                          f"{', '.join(map(str, VERIFIED_TENSOR_PARALLEL))}); use "
                          f"tensor_parallel_size 1 or --backend hf")


def check_covered(base_architectures: list[str], target_modules: list[str] | tuple[str, ...],
                  tensor_parallel_size: int) -> None:
    """Raise PluginError unless the plugin serves adapters on these targets of this base
    architecture exactly at this parallelism."""
    plugin_architecture(base_architectures)
    check_adapter_config({"method": "hydralora", "target_modules": list(target_modules)},
                         tensor_parallel_size)


def read_adapter_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / ADAPTER_DIR / "adapter_config.json").read_text())


def is_plugin_export(model_dir: Path) -> bool:
    """A checkpoint whose config names a plugin architecture (a servable HydraLoRA export)."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(a in PLUGIN_ARCHITECTURES.values() for a in architectures)
