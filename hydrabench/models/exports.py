"""The configs of hydrabench's HydraLoRA exports: model types that plain transformers refuses.

A HydraLoRA export (`hydrabench export RUN`, docs/serving.md) is the base checkpoint plus the
adapter in a folder of its own (hydralora/), which transformers never reads: loaded as its base
architecture, it is the base model with the adapter silently left out. So its config.json names
a model type of its own (`hydrabench_hydralora_llama`, `hydrabench_hydralora_qwen2`), which
transformers knows only where hydrabench registers it (`register_export_configs`: hydrabench's
model loading and its vLLM plugin); plain transformers refuses it in one error naming that type.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, LlamaConfig, PretrainedConfig, Qwen2Config

from hydrabench.errors import SpecError


class HydraLoraLlamaConfig(LlamaConfig):
    model_type = "hydrabench_hydralora_llama"


class HydraLoraQwen2Config(Qwen2Config):
    model_type = "hydrabench_hydralora_qwen2"


# The base model's config class -> its export's (classes, not made on the fly: vLLM pickles the
# config to its worker processes, which import it by name).
EXPORT_CONFIGS: dict[type[PretrainedConfig], type[PretrainedConfig]] = {
    LlamaConfig: HydraLoraLlamaConfig, Qwen2Config: HydraLoraQwen2Config}


def register_export_configs() -> None:
    """Make transformers' AutoConfig know the exports' model types (in this process)."""
    for config in EXPORT_CONFIGS.values():
        AutoConfig.register(config.model_type, config, exist_ok=True)


def export_model_type(base_config: PretrainedConfig) -> str:
    """The model type an export of a model with this config names in its config.json."""
    export = EXPORT_CONFIGS.get(type(base_config))
    if export is None:
        raise SpecError(f"model type {base_config.model_type} has no HydraLoRA export type "
                        f"(covered: {', '.join(c.model_type for c in EXPORT_CONFIGS)})")
    return export.model_type


def exported_base_config(directory: Path) -> PretrainedConfig | None:
    """The base model's config of an export in `directory` (transformers builds the base model
    from it, to which hydrabench then adds the adapter); None for any other checkpoint."""
    config = json.loads((directory / "config.json").read_text())
    bases = {export.model_type: base for base, export in EXPORT_CONFIGS.items()}
    base = bases.get(config.get("model_type"))
    return None if base is None else base.from_dict(
        {key: value for key, value in config.items() if key != "model_type"})
