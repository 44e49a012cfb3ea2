"""The method registry: one module per method, one line here."""

from __future__ import annotations

from hydrabench.methods import base, full, hydralora, lora, lora_split
from hydrabench.methods.api import Method
from hydrabench.spec import did_you_mean

METHODS: dict[str, Method] = {m.name: m for m in (
    base.METHOD,
    lora.METHOD,
    lora_split.METHOD,
    full.METHOD,
    hydralora.METHOD,
    hydralora.UNIFORM_GATE_METHOD,
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise did_you_mean("method", name, list(METHODS))
    return METHODS[name]
