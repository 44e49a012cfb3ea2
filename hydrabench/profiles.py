"""Profiles (hydrabench/profiles/*.yaml or the user's own file) and sharding configs: loading,
`extends:`, validation; and the device a resolved spec runs on here."""

from __future__ import annotations

import copy
import os
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from hydrabench.errors import SpecError, did_you_mean, require
from hydrabench.spec import RunSpec

PROFILE_DIR = Path(str(resources.files("hydrabench") / "profiles"))


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_yaml(path: Path) -> dict[str, Any]:
    """Parse a YAML mapping; a syntax error becomes one line naming file:line."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not a YAML text file (not UTF-8: binary?)") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError(f"malformed YAML at {where}: {err.problem}") from None
    except yaml.YAMLError as err:  # e.g. control characters the reader refuses
        raise SpecError(f"malformed YAML in {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SpecError(f"malformed YAML in {path}: expected a mapping at the top level")
    return data


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _deep_merge(base[key], value) if both_dicts else value
    return merged


def load_profile(name: str) -> dict[str, Any]:
    """A profile's YAML: a shipped one by name, or the user's own file (a path ending in .yaml);
    `extends: other` starts from another profile and overrides its keys. A file not found here
    that a loaded record was made with is the resolved profile that record carries."""
    if name in _RECORDED_PROFILES and not Path(name).is_file():
        return copy.deepcopy(_RECORDED_PROFILES[name])
    return copy.deepcopy(_load_profile(name))  # a copy: callers may change what they get


# Profile file → the resolved profile a record made with it carries (RunStore.load fills it), so
# that a run can be evaluated again or exported from another directory.
_RECORDED_PROFILES: dict[str, dict[str, Any]] = {}


def remember_profile(name: str, profile: dict[str, Any]) -> None:
    if name.endswith((".yaml", ".yml")):
        _RECORDED_PROFILES[name] = profile


@cache  # reports resolve hundreds of specs; parse each profile once
def _load_profile(name: str) -> dict[str, Any]:
    profile = _extended_profile(name, ())
    _check_profile(name, profile)
    return profile


# Every top-level key a profile may hold (the shipped ones use all of them but trust_remote_code).
PROFILE_KEYS: dict[str, type | tuple[type, ...]] = {
    "extends": str, "name": str, "description": str, "model": str, "device": str, "dtype": str,
    "prompt_template": str, "country_iso_code": str, "estimate": str, "requires_gpu": bool,
    "trust_remote_code": bool, "seed": int, "train": dict, "adapter": dict, "eval": dict,
    "sharding": dict, "slurm": dict, "tasks": dict}
TASK_KEYS = {"corpus": str, "local_corpus": str, "eval": list}


def _extended_profile(name: Any, chain: tuple[str, ...]) -> dict[str, Any]:
    """The profile `name` with what it `extends:`, its own keys checked; `chain` finds loops."""
    require(isinstance(name, str), f"extends must name a profile, got {name!r}")
    require(name not in chain, f"profile extends loop: {' → '.join([*chain, name])}")
    if name.endswith((".yaml", ".yml")):
        require(Path(name).is_file(), f"profile file {name} not found")
        profile = load_yaml(Path(name))
    elif name in profile_names():
        profile = load_yaml(PROFILE_DIR / f"{name}.yaml")
    else:
        raise did_you_mean("profile", name, profile_names())
    for key, value in profile.items():
        if key not in PROFILE_KEYS:
            raise did_you_mean(f"key in profile {name}:", key, list(PROFILE_KEYS))
        kind = PROFILE_KEYS[key]
        require(isinstance(value, kind) and (kind is bool or not isinstance(value, bool)),
                f"profile {name}: {key} must be {_KIND_NAMES[kind]}, got {value!r}")
    parent = profile.pop("extends", None)
    return _deep_merge(_extended_profile(parent, (*chain, name)), profile) if parent else profile


_KIND_NAMES = {str: "a string", bool: "true or false", int: "an integer", dict: "a mapping"}


def _check_profile(name: str, profile: dict[str, Any]) -> None:
    """What the resolved profile needs: a model, and tasks that each name a corpus and a list of
    lm-eval tasks."""
    require("model" in profile, f"profile {name} names no model")
    for task, entry in profile.get("tasks", {}).items():
        require(isinstance(entry, dict), f"profile {name}: task {task} must be a mapping with "
                                         f"corpus and eval, got {entry!r}")
        for key, value in entry.items():
            require(key in TASK_KEYS, f"profile {name}: task {task} has unknown key {key!r}; "
                                      f"valid: {', '.join(TASK_KEYS)}")
            require(isinstance(value, TASK_KEYS[key]) and (key != "eval" or (value and all(
                isinstance(t, str) for t in value))), f"profile {name}: task {task}: {key} must "
                f"be {'a list of lm-eval task names' if key == 'eval' else 'a string'}, "
                f"got {value!r}")
        for key in ("corpus", "eval"):
            require(key in entry, f"profile {name}: task {task} has no {key}")


SHARDING_DIR = Path(str(resources.files("hydrabench") / "sharding"))
SHARDING_KEYS = {"reshard_after_forward": bool, "reduce_dtype": (str, type(None)),
                 "cpu_offload": bool}


def load_sharding(name: str) -> dict[str, Any]:
    """A shipped FSDP config, checked and resolved with its name (recorded in the spec)."""
    return dict(_load_sharding(name))  # a copy: the spec owns what it gets


@cache  # every resolved spec of the method reads it; parse it once
def _load_sharding(name: str) -> dict[str, Any]:
    names = sorted(p.stem for p in SHARDING_DIR.glob("*.yaml"))
    if name not in names:
        raise did_you_mean("sharding config", name, names)
    options = load_yaml(SHARDING_DIR / f"{name}.yaml")
    for key, value in options.items():
        require(key in SHARDING_KEYS, f"unknown key {key!r} in sharding config {name}; "
                                      f"valid: {', '.join(SHARDING_KEYS)}")
        require(isinstance(value, SHARDING_KEYS[key]),
                f"sharding config {name}: {key} has the wrong type ({value!r})")
    return {"name": name, **options}


def runtime_device(spec: RunSpec) -> str:
    """The device to run on here. `auto` (kept as is in the spec, so run ids do not depend on the
    machine) means CUDA when available; a GPU-only profile's default model refuses the CPU."""
    import torch

    has_cuda = torch.cuda.is_available()
    profile = load_profile(spec.profile)
    if profile.get("requires_gpu") and not has_cuda and spec.model == profile["model"]:
        raise SpecError(f"profile {spec.profile} needs a GPU for {spec.model} and none is "
                        "visible; pass --model with a small local model to check its wiring on "
                        "CPU")
    device = ("cuda" if has_cuda else "cpu") if spec.device == "auto" else spec.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per torchrun process
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device
