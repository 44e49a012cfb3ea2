"""Base models: the embedded tiny default (`builtin:tiny`), a local directory or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hydrabench.errors import SpecError

BUILTIN_TINY = "builtin:tiny"


@dataclass
class BaseModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user named: builtin:tiny, a path or a hub id
    directory: Path | None  # local files, when there are any


def resolve_model_dir(name: str) -> Path | None:
    """The local directory for `name`, building the tiny default; None for a hub id. Where a
    local model is named, transformers is taught hydrabench's export types first."""
    if name == BUILTIN_TINY:
        from hydrabench.models.tiny import build_tiny_model

        return build_tiny_model()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise SpecError(f"model path {name} has no config.json: not a transformers model")
        from hydrabench.models.exports import register_export_configs

        register_export_configs()
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise SpecError(f"model path {name} does not exist (and it is not a hub id org/name)")
    return None


def load_base_model(name: str, dtype: str = "float32", device: str = "cpu",
                    trust_remote_code: bool = False) -> BaseModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hydrabench.models.exports import exported_base_config

    directory = resolve_model_dir(name)
    source = str(directory) if directory else name
    try:
        # An export: its base model (the caller adds the adapter, serving.export).
        exported = directory and exported_base_config(directory)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
            **({"config": exported} if exported else {}))
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SpecError(f"cannot load causal LM {name!r}: {first_line}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(model.to(device).eval(), tokenizer, name, directory)
