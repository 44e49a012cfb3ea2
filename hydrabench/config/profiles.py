"""Profiles (hydrabench/config/profiles/*.yaml or the user's own file) and sharding configs:
loading, `extends:`, validation; and the device a resolved spec runs on here."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from hydrabench.config.spec import (
    AdapterSettings,
    EvalSettings,
    RunSpec,
    TrainSettings,
    check_model_settings,
    parse_settings,
)
from hydrabench.errors import SpecError, did_you_mean, require

PROFILE_DIR = Path(str(resources.files("hydrabench.config") / "profiles"))


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_yaml(path: Path, loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> dict[str, Any]:
    """Parse a YAML mapping; a syntax error becomes one line naming file:line."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)  # a SafeLoader
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


@dataclass(frozen=True)
class TaskColumn:
    """A column of the paper's tables: the corpus it trains on and the lm-eval tasks scoring it."""

    corpus: str
    eval: tuple[str, ...]
    local_corpus: str | None = None  # the copy trained on offline (HYDRABENCH_DATA_DIR set)


@dataclass(frozen=True)
class Profile:
    """A resolved profile (`extends:` applied), every key checked when it is loaded. train,
    adapter and eval hold the settings the spec's sections start from (hydrabench.config.spec)."""

    model: str
    name: str = ""
    description: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    prompt_template: str = "plain"
    country_iso_code: str = "USA"
    estimate: str = "minutes on a CPU"  # what a run of it takes, said in every plan line
    requires_gpu: bool = False
    trust_remote_code: bool = False
    seed: int = 0
    train: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    # method → hydrabench/config/sharding/NAME
    sharding: dict[str, str] = field(default_factory=dict)
    slurm: dict[str, Any] = field(default_factory=dict)  # checked by hydrabench.pipeline.sweep
    tasks: dict[str, TaskColumn] = field(default_factory=dict)
    # Folders of the user's own task YAML and table specs (hydrabench.config.includes), absolute:
    # the file gives them relative to its own folder.
    include_path: tuple[str, ...] = ()
    # The resolved YAML mapping: what records carry and `hydrabench profile show` prints.
    mapping: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.mapping)


def load_profile(name: str) -> Profile:
    """A profile: a shipped one by name, or the user's own file (a path ending in .yaml);
    `extends: other` starts from another profile and overrides its keys. A file not found here
    that a loaded record was made with is the resolved profile that record carries."""
    if name in _RECORDED_PROFILES and not Path(name).is_file():
        return _recorded_profile(name, _RECORDED_PROFILES[name])
    return copy.deepcopy(_load_profile(name))  # a copy: callers may change its sections


# Profile file → the resolved profile a record made with it carries (RunStore.load fills it), so
# that a run can be evaluated again or exported from another directory.
_RECORDED_PROFILES: dict[str, dict[str, Any]] = {}


def remember_profile(name: str, profile: dict[str, Any]) -> None:
    if name.endswith((".yaml", ".yml")):
        _RECORDED_PROFILES[name] = profile


def _recorded_profile(name: str, mapping: dict[str, Any]) -> Profile:
    where = f"{name} (as its record carries it)"
    _check_keys(where, mapping)
    return _build_profile(where, copy.deepcopy(mapping))


@cache  # reports resolve hundreds of specs; parse each profile once
def _load_profile(name: str) -> Profile:
    return _build_profile(_profile_file(name), _extended_profile(name, ()))


# A profile's YAML kind per Profile field's declared type (and `extends`, read before the rest).
_YAML_KINDS: dict[str, type | tuple[type, ...]] = {
    "str": str, "bool": bool, "int": int, "dict": dict, "tuple": (list, str)}
PROFILE_KEYS: dict[str, type | tuple[type, ...]] = {
    "extends": str, **{f.name: _YAML_KINDS[str(f.type).split("[")[0]]
                       for f in fields(Profile) if f.name != "mapping"}}
TASK_KEYS = {"corpus": str, "local_corpus": str, "eval": list}
_KIND_NAMES = {str: "a string", bool: "true or false", int: "an integer", dict: "a mapping",
               (list, str): "a list of folders"}


def _profile_file(name: str) -> Path:
    return Path(name) if name.endswith((".yaml", ".yml")) else PROFILE_DIR / f"{name}.yaml"


def _extended_profile(name: Any, chain: tuple[str, ...]) -> dict[str, Any]:
    """The profile `name` with what it `extends:`, its own keys checked and its include_path
    made absolute; `chain` finds loops."""
    require(isinstance(name, str), f"extends must name a profile, got {name!r}")
    require(name not in chain, f"profile extends loop: {' → '.join([*chain, name])}")
    if name.endswith((".yaml", ".yml")):
        require(Path(name).is_file(), f"profile file {name} not found")
    elif name not in profile_names():
        raise did_you_mean("profile", name, profile_names())
    path = _profile_file(name)
    profile = load_yaml(path)
    _check_keys(str(path), profile)
    if "include_path" in profile:
        folders = profile["include_path"]
        profile["include_path"] = [str((path.parent / folder).resolve()) for folder in (
            [folders] if isinstance(folders, str) else folders)]
    parent = profile.pop("extends", None)
    return _deep_merge(_extended_profile(parent, (*chain, name)), profile) if parent else profile


def _check_keys(where: str, profile: dict[str, Any]) -> None:
    for key, value in profile.items():
        if key not in PROFILE_KEYS:
            raise did_you_mean(f"key in profile {where}:", key, list(PROFILE_KEYS))
        kind = PROFILE_KEYS[key]
        require(isinstance(value, kind) and (kind is bool or not isinstance(value, bool)),
                f"profile {where}: {key} must be {_KIND_NAMES[kind]}, got {value!r}")
    require(all(isinstance(folder, str) for folder in profile.get("include_path", ())),
            f"profile {where}: include_path must be a list of folders, got "
            f"{profile.get('include_path')!r}")


def _build_profile(where: str | Path, mapping: dict[str, Any]) -> Profile:
    """The Profile of a resolved mapping: it names a model; its tasks each name a corpus and a
    list of lm-eval tasks; its train, adapter and eval settings are what the spec accepts."""
    require("model" in mapping, f"profile {where} names no model")
    tasks = {}
    for task, entry in mapping.get("tasks", {}).items():
        require(isinstance(entry, dict), f"profile {where}: task {task} must be a mapping with "
                                         f"corpus and eval, got {entry!r}")
        for key, value in entry.items():
            require(key in TASK_KEYS, f"profile {where}: task {task} has unknown key {key!r}; "
                                      f"valid: {', '.join(TASK_KEYS)}")
            require(isinstance(value, TASK_KEYS[key]) and (key != "eval" or (value and all(
                isinstance(t, str) for t in value))), f"profile {where}: task {task}: {key} "
                f"must be {'a list of lm-eval task names' if key == 'eval' else 'a string'}, "
                f"got {value!r}")
        for key in ("corpus", "eval"):
            require(key in entry, f"profile {where}: task {task} has no {key}")
        tasks[task] = TaskColumn(entry["corpus"], tuple(entry["eval"]), entry.get("local_corpus"))
    for method, config in mapping.get("sharding", {}).items():
        require(isinstance(config, str), f"profile {where}: sharding: {method} must name a "
                                         f"sharding config, got {config!r}")
    check_model_settings(f"profile {where}", *(mapping.get(key, getattr(Profile, key)) for key in
                                               ("device", "dtype", "prompt_template")))
    for section, settings in (("train", TrainSettings), ("adapter", AdapterSettings),
                              ("eval", EvalSettings)):
        try:
            parse_settings(settings, mapping.get(section, {}), section)
        except SpecError as err:  # a wrong type, or a value out of range: name the file
            raise SpecError(f"profile {where}: {err}") from None
    values = {key: mapping[key] for key in PROFILE_KEYS if key in mapping and key != "extends"}
    return Profile(**{**values, "tasks": tasks,
                      "include_path": tuple(mapping.get("include_path", ()))}, mapping=mapping)


SHARDING_DIR = Path(str(resources.files("hydrabench.config") / "sharding"))
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


def check_gpu_visible(profile_name: str, model: str) -> None:
    """A GPU-only profile's default model refuses a machine with no GPU visible."""
    import torch

    profile = load_profile(profile_name)
    if profile.requires_gpu and model == profile.model and not torch.cuda.is_available():
        raise SpecError(f"profile {profile_name} needs a GPU for {model} and none is visible; "
                        "pass --model with a small local model to check its wiring on CPU")


def runtime_device(spec: RunSpec) -> str:
    """The device to run on here. `auto` (kept as is in the spec, so run ids do not depend on the
    machine) means CUDA when available; a GPU-only profile's default model refuses the CPU."""
    import torch

    check_gpu_visible(spec.profile, spec.model)
    has_cuda = torch.cuda.is_available()
    device = ("cuda" if has_cuda else "cpu") if spec.device == "auto" else spec.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per torchrun process
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device
