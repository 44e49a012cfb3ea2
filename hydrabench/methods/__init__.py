"""The method registry: one module per method, one line here."""

from __future__ import annotations

from hydrabench.errors import did_you_mean
from hydrabench.methods import (
    adalora,
    base,
    flylora,
    full,
    hydralora,
    ia3,
    lora,
    lora_split,
    lorahub,
    loramoe,
    molora,
    moslora,
    prompt_learning,
    r_lora,
)
from hydrabench.methods.api import Method

METHODS: dict[str, Method] = {m.name: m for m in (
    base.METHOD,
    lora.METHOD,
    lora_split.METHOD,
    lora_split.SUM_METHOD,
    lora_split.ROUTED_METHOD,
    full.METHOD,
    hydralora.METHOD,
    hydralora.UNIFORM_GATE_METHOD,
    loramoe.METHOD,
    lorahub.METHOD,
    prompt_learning.PROMPT_TUNING,
    prompt_learning.P_TUNING,
    prompt_learning.PREFIX_TUNING,
    ia3.METHOD,
    adalora.METHOD,
    moslora.METHOD,
    molora.METHOD,
    r_lora.METHOD,
    flylora.METHOD,
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise did_you_mean("method", name, list(METHODS))
    return METHODS[name]
