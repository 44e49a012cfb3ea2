"""Energy and throughput metering around one phase (train, export, eval) of a run.

Every energy figure carries the source it came from, so that a report never presents an
estimate as a measurement:

- ``measured:nvml``: NVML's cumulative GPU energy counter (Volta and newer);
- ``measured:nvml-power-samples``: trapezoid integral of sampled NVML board power;
- ``measured:rapl``: the CPU package RAPL counters under ``/sys/class/powercap``;
- ``estimated:codecarbon``: CodeCarbon's model (TDP-based CPU guess, fixed RAM power);
- ``unavailable: <reason>``: no figure, and why (MIG, no permission, a GPU NVML cannot find);
- ``none`` (GPU only): the run computed on the CPU, so no GPU energy is charged to it.

``gpu_source`` says on its own whether the GPU energy was measured; ``energy_measured`` is true
only when every component is (rarely: RAM is CodeCarbon's estimate wherever CodeCarbon runs).

GPU energy covers only the run's GPUs (see :func:`run_cuda_ordinals`), each matched to NVML by
the UUID CUDA gives it, so ``CUDA_VISIBLE_DEVICES`` and CUDA's device order are honoured; a GPU
reading is whole-device (every process on it), RAPL whole-machine, like CodeCarbon's default
"machine" tracking mode.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import platform
import re
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psutil
import torch

try:
    import pynvml
except ImportError:  # the package is a dependency, but metering must never break a run
    pynvml = None

RAPL_ROOT = Path("/sys/class/powercap")
# Top-level zones only ("intel-rapl:0", not "intel-rapl:0:1"): subzones are already included
# in their package's counter and would be counted twice.
_RAPL_ZONE = re.compile(r"intel-rapl:\d+$")
_MJ_PER_KWH = 3.6e9
_J_PER_KWH = 3.6e6
_UJ_PER_KWH = 3.6e12


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class EnergyMetrics:
    """Energy of one phase by component (kWh), each with its source label. `gpu_per_device`:
    one entry per GPU of the run (CUDA ordinal, NVML index, UUID, name, kWh, source)."""

    gpu_kwh: float | None
    gpu_source: str
    gpu_per_device: list[dict[str, Any]]
    cpu_kwh: float | None
    cpu_source: str
    ram_kwh: float | None
    ram_source: str
    total_kwh: float | None
    co2eq_kg: float | None
    co2_source: str
    energy_measured: bool


@dataclass
class ThroughputMetrics:
    """Wall time, counts, rates and peak memory of one phase."""

    wall_s: float
    steps: int
    tokens: int
    samples: int
    tokens_per_s: float
    samples_per_s: float
    step_time_mean_s: float | None
    step_time_p50_s: float | None
    step_time_p95_s: float | None
    peak_memory_bytes: int
    peak_memory_source: str
    # Evaluation counters stay None unless Meter.add_eval was called.
    requests: int | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    requests_per_s: float | None = None
    prompt_tokens_per_s: float | None = None
    generated_tokens_per_s: float | None = None


@dataclass
class PhaseMetrics:
    """Everything measured for one phase; ``to_dict()`` is JSON-serialisable."""

    phase: str
    energy: EnergyMetrics
    throughput: ThroughputMetrics
    # [seconds since phase start, total watts over visible GPUs], downsampled to a cap.
    power_samples_w: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return the metrics as plain dicts, lists and numbers."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# RAPL


def rapl_delta_uj(start_uj: int, end_uj: int, max_energy_range_uj: int) -> int:
    """Energy between two readings of one RAPL counter, allowing for one wrap-around."""
    if end_uj >= start_uj:
        return end_uj - start_uj
    return max_energy_range_uj - start_uj + end_uj


class RaplReader:
    """Accumulates CPU package energy from RAPL counters under ``root``.

    ``poll()`` must run more often than the counter wraps (tens of minutes at full load), so
    Meter calls it from its sampling thread rather than only at the phase edges.
    """

    def __init__(self, root: Path | str = RAPL_ROOT) -> None:
        self.zones: list[Path] = []
        self.max_uj: list[int] = []
        self.error: str | None = None
        self.total_uj = 0
        self._last: list[int] | None = None
        root = Path(root)
        try:
            for zone in sorted(p for p in root.glob("intel-rapl:*") if _RAPL_ZONE.match(p.name)):
                name_file = zone / "name"
                # "psys" (platform) zones contain the package again; keep only packages.
                if name_file.exists() and not name_file.read_text().startswith("package"):
                    continue
                self.max_uj.append(int((zone / "max_energy_range_uj").read_text()))
                int((zone / "energy_uj").read_text())  # root-only on many kernels
                self.zones.append(zone)
        except (OSError, ValueError) as exc:
            self.zones, self.max_uj = [], []
            self.error = f"unavailable: RAPL unreadable ({type(exc).__name__})"
            return
        if not self.zones:
            self.error = f"unavailable: no RAPL package zones under {root}"

    @property
    def available(self) -> bool:
        """True while the counters can be read."""
        return self.error is None

    def _read(self) -> list[int]:
        return [int((zone / "energy_uj").read_text()) for zone in self.zones]

    def start(self) -> None:
        """Take the reference reading and reset the accumulated energy."""
        self.total_uj = 0
        self._last = self._read()

    def poll(self) -> None:
        """Add the energy since the previous reading to ``total_uj``."""
        if not self.available or self._last is None:
            return
        try:
            current = self._read()
        except (OSError, ValueError) as exc:
            self.error = f"unavailable: RAPL read failed ({type(exc).__name__})"
            return
        for prev, cur, max_uj in zip(self._last, current, self.max_uj, strict=True):
            self.total_uj += rapl_delta_uj(prev, cur, max_uj)
        self._last = current

    @property
    def kwh(self) -> float:
        """Accumulated energy in kWh."""
        return self.total_uj / _UJ_PER_KWH


# --------------------------------------------------------------------------------------------
# NVML helpers


def _text(value: Any) -> str:
    # Older pynvml releases return bytes for names and versions.
    return value.decode() if isinstance(value, bytes) else str(value)


def _visible_gpu_handles(nvml: Any) -> list[tuple[int, Any]]:
    """(NVML index, handle) of the GPUs this process may use, honouring CUDA_VISIBLE_DEVICES.

    NVML enumerates every GPU on the node; counting all of them would charge a single-GPU job
    for its neighbours. Integer entries are taken as NVML indices (CUDA's order matches on
    the usual homogeneous nodes); "GPU-..." entries may be UUID prefixes, as CUDA allows.
    """
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return list(enumerate(handles))
    uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles] if "GPU-" in spec else []
    chosen: list[tuple[int, Any]] = []
    for entry in (e.strip() for e in spec.split(",")):
        if entry.isdigit() and int(entry) < len(handles):
            index = int(entry)
        elif entry.startswith("GPU-") and any(u.startswith(entry) for u in uuids):
            index = next(i for i, u in enumerate(uuids) if u.startswith(entry))
        else:
            # CUDA ignores an invalid entry and all after it; MIG slices land here too
            # (they expose no energy counter, and the parent's counts other tenants).
            break
        chosen.append((index, handles[index]))
    return chosen


def _nvml_energy_mj(nvml: Any, handle: Any) -> tuple[int | None, str | None]:
    """(counter in mJ, None), or (None, the NVML error): pre-Volta GPUs raise NotSupported, a
    locked-down node NoPermission; either means "no counter on this GPU"."""
    try:
        return int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle)), None
    except nvml.NVMLError as exc:
        return None, type(exc).__name__


def _nvml_power_w(nvml: Any, handle: Any) -> tuple[float | None, str | None]:
    try:
        return nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0, None
    except nvml.NVMLError as exc:
        return None, type(exc).__name__


def _trapezoid_kwh(samples: list[tuple[float, list[float | None]]], device: int) -> float | None:
    """Integral of one device's sampled power; None without two consecutive readings."""
    joules = 0.0
    pairs = 0
    for (t0, w0), (t1, w1) in itertools.pairwise(samples):
        if w0[device] is not None and w1[device] is not None:
            joules += (t1 - t0) * (w0[device] + w1[device]) / 2
            pairs += 1
    return joules / _J_PER_KWH if pairs else None


def gpu_inventory() -> list[dict[str, Any]]:
    """Name, memory and driver of each visible GPU via NVML; [] when there is none."""
    if pynvml is None:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        return [
            {
                "index": index,
                "name": _text(pynvml.nvmlDeviceGetName(handle)),
                "memory_total_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                "driver": driver,
            }
            for index, handle in _visible_gpu_handles(pynvml)
        ]
    except pynvml.NVMLError:
        return []
    finally:
        pynvml.nvmlShutdown()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_build_libraries(config: str) -> dict[str, str | None]:
    """The BLAS and LAPACK `torch.__config__.show()` names ("BLAS_INFO=mkl, ..."); None where
    the build line does not say."""
    found = {key: re.search(rf"\b{key}_INFO=([^,\s]+)", config) for key in ("BLAS", "LAPACK")}
    return {key.lower(): m.group(1) if m else None for key, m in found.items()}


def hardware_summary() -> dict[str, Any]:
    """Hardware and software facts for the provenance section of a run record.

    CPU results move with the thread count and the BLAS kernels (reductions are summed in a
    different order), so the record names both, with the CPU's vector instruction set."""
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "mkl_num_threads": os.environ.get("MKL_NUM_THREADS"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **torch_build_libraries(torch.__config__.show()),
        "ram_total_bytes": int(psutil.virtual_memory().total),
        "gpus": gpu_inventory(),
        "torch_version": torch.__version__,
        "torch_cuda_available": torch.cuda.is_available(),
        "torch_cuda_version": torch.version.cuda,
        "platform": platform.platform(),
        "python_version": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------
# The run's GPUs

_MIG = ("unavailable: MIG (NVML has no energy counter per MIG instance, and the whole GPU's "
        "counts every instance on it)")


def visible_devices(spec: str | None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES's entries as CUDA reads them: up to the first it cannot parse (CUDA
    drops that one and all after it); None when unset (every GPU visible)."""
    if spec is None:
        return None
    entries: list[str] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        entries.append(entry)
    return entries


def run_cuda_ordinals(device: str | torch.device | None) -> list[int]:
    """This process's CUDA ordinals the run computes on; [] for a CPU run.

    `device` None (the caller did not say): the CUDA device this process has initialised, none
    if it never touched CUDA (it ran on the CPU). Under torchrun each local process has its own
    GPU (cuda:LOCAL_RANK) and rank 0 records the run, so the run is charged for all of them.
    """
    if device is None:
        if not _cuda_in_use():
            return []
        index = torch.cuda.current_device()
    else:
        parsed = torch.device(device)
        if parsed.type != "cuda":
            return []
        if parsed.index is not None:
            index = parsed.index
        else:
            index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return list(range(local)) if local > 1 else [index]


def cuda_uuid(ordinal: int) -> str | None:
    """The UUID CUDA gives this process's device `ordinal` (whatever CUDA_VISIBLE_DEVICES and
    CUDA_DEVICE_ORDER made it); None where torch has no CUDA or cannot tell."""
    if not torch.cuda.is_available():
        return None
    try:
        return str(torch.cuda.get_device_properties(ordinal).uuid)
    except (AssertionError, AttributeError, RuntimeError):
        return None


def _bare_uuid(uuid: str) -> str:
    # NVML writes "GPU-<hex>", torch the bare hex
    return uuid.lower().removeprefix("gpu-").removeprefix("mig-")


def _mig_enabled(nvml: Any, handle: Any) -> bool:
    try:
        return int(nvml.nvmlDeviceGetMigMode(handle)[0]) == 1
    except (AttributeError, nvml.NVMLError):  # an old pynvml, or a GPU without MIG
        return False


@dataclass
class RunGpu:
    """One GPU the run computes on, as NVML sees it."""

    cuda: int  # this process's CUDA ordinal
    index: int | None = None  # NVML's index; None: NVML has no device to read for it
    handle: Any = None
    uuid: str | None = None
    unavailable: str | None = None  # why nothing can be read for it

    @property
    def readable(self) -> bool:
        return self.unavailable is None


def run_gpus(nvml: Any, ordinals: list[int], spec: str | None,
             uuid_of: Any = cuda_uuid) -> list[RunGpu]:
    """The NVML devices of the run's CUDA `ordinals` under CUDA_VISIBLE_DEVICES=`spec`.

    A device is matched by the UUID CUDA gives it (`uuid_of`): CUDA numbers devices fastest
    first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, NVML by PCI bus, so an integer entry is not an
    NVML index. Only where CUDA cannot tell (no CUDA in torch) are integers taken as NVML's.
    """
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
    entries = visible_devices(spec)
    gpus = []
    for ordinal in ordinals:
        gpu = _run_gpu(nvml, ordinal, entries, uuid_of(ordinal), handles, uuids)
        if gpu.handle is not None and _mig_enabled(nvml, gpu.handle):
            gpu.unavailable = _MIG
        gpus.append(gpu)
    return gpus


def _run_gpu(nvml: Any, ordinal: int, entries: list[str] | None, uuid: str | None,
             handles: list[Any], uuids: list[str]) -> RunGpu:
    if entries is not None and ordinal >= len(entries):
        return RunGpu(ordinal, unavailable=f"unavailable: CUDA device {ordinal} is not among "
                                           f"the {len(entries)} CUDA_VISIBLE_DEVICES lists")
    entry = entries[ordinal] if entries is not None else None
    if entry is not None and entry.startswith("MIG-"):
        return RunGpu(ordinal, uuid=entry, unavailable=_MIG)
    if uuid is not None:
        matches = [i for i, u in enumerate(uuids) if _bare_uuid(u) == _bare_uuid(uuid)]
        if not matches and any(_mig_enabled(nvml, h) for h in handles):
            return RunGpu(ordinal, uuid=uuid, unavailable=_MIG)  # CUDA named a MIG instance
    elif entry is not None and entry.startswith("GPU-"):
        matches = [i for i, u in enumerate(uuids) if u.startswith(entry)]  # a unique prefix
    else:
        wanted = int(entry) if entry is not None else ordinal
        matches = [wanted] if wanted < len(handles) else []
    if len(matches) != 1:
        return RunGpu(ordinal, uuid=uuid, unavailable=f"unavailable: NVML has no GPU for CUDA "
                                                      f"device {ordinal} ({uuid or entry})")
    index = matches[0]
    return RunGpu(ordinal, index=index, handle=handles[index], uuid=uuids[index])


# --------------------------------------------------------------------------------------------
# Meter


def _cuda_in_use() -> bool:
    # Only an existing CUDA context is touched: creating one just to meter would cost GPU
    # memory and seconds, and a process that never initialised CUDA has no GPU work to wait for.
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of a sorted, non-empty list."""
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def _is_measured(source: str) -> bool:
    return source.startswith("measured:")


class Meter:
    """Context manager measuring energy, CO2eq and throughput of one phase (one Meter each).

    Example::

        with Meter(phase="train", country_iso_code="USA") as meter:
            for batch in loader:
                train_step(batch)
                meter.step(tokens=int(batch["attention_mask"].sum()), samples=len(batch))
        record["train"] = meter.result.to_dict()

    CUDA is synchronised at the phase edges only, so the window matches the queued work
    without slowing individual steps down.
    """

    def __init__(
        self,
        phase: str,
        country_iso_code: str = "USA",
        codecarbon_dir: str | Path | None = None,
        sample_interval_s: float = 0.5,
        codecarbon_interval_s: float = 5.0,
        use_codecarbon: bool = True,
        rapl_root: str | Path = RAPL_ROOT,
        max_power_samples: int = 600,
        device: str | torch.device | None = None,
    ) -> None:
        """`device`: the run's device ("cpu", "cuda", "cuda:1"); None infers it (the CUDA device
        this process has initialised, else the CPU). A CPU run charges no GPU energy."""
        self.phase = phase
        self.device = device
        self.country_iso_code = country_iso_code
        self.codecarbon_dir = Path(codecarbon_dir) if codecarbon_dir is not None else None
        self.sample_interval_s = sample_interval_s
        self.codecarbon_interval_s = codecarbon_interval_s
        self.use_codecarbon = use_codecarbon
        self.rapl_root = Path(rapl_root)
        self.max_power_samples = max_power_samples
        self.result: PhaseMetrics | None = None

        self._step_times: list[float] = []
        self._tokens = 0
        self._samples = 0
        self._eval: dict[str, int] | None = None
        self._t0 = 0.0
        self._last = 0.0
        self._tracker: Any = None
        self._codecarbon_error = "unavailable: codecarbon disabled"
        self._nvml: Any = None
        self._nvml_error = "unavailable: pynvml not installed"
        self._gpus: list[RunGpu] = []
        self._energy_start: list[tuple[int | None, str | None]] = []
        self._power_errors: dict[int, str] = {}  # slot -> the last NVML error reading its power
        self._power: list[tuple[float, list[float | None]]] = []
        self._rapl: RaplReader | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- hot path ----------------------------------------------------------------------------

    def step(self, tokens: int = 0, samples: int = 0) -> None:
        """Record one step: wall time since the previous step (or phase start) and counts."""
        now = time.perf_counter()
        self._step_times.append(now - self._last)
        self._last = now
        self._tokens += tokens
        self._samples += samples

    def add_eval(
        self, requests: int = 0, prompt_tokens: int = 0, generated_tokens: int = 0
    ) -> None:
        """Add evaluation counts; the result then reports per-second rates for them."""
        if self._eval is None:
            self._eval = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0}
        self._eval["requests"] += requests
        self._eval["prompt_tokens"] += prompt_tokens
        self._eval["generated_tokens"] += generated_tokens

    # -- phase edges -------------------------------------------------------------------------

    def __enter__(self) -> Self:
        # CodeCarbon first: its ~1.6 s start-up should not count as part of the phase.
        if self.use_codecarbon:
            self._start_codecarbon()
        self._open_nvml()
        rapl = RaplReader(self.rapl_root)
        self._rapl = rapl if rapl.available else None
        if self._rapl is not None:
            self._rapl.start()

        if _cuda_in_use():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._t0 = self._last = time.perf_counter()
        self._energy_start = self._read_energy()
        self._sample()
        if any(gpu.readable for gpu in self._gpus) or self._rapl is not None:
            self._thread = threading.Thread(
                target=self._sample_loop, name=f"hydrabench-meter-{self.phase}", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if _cuda_in_use():
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()
        energy_end = self._read_energy()
        gpu_kwh, gpu_source, per_device = self._gpu_energy(energy_end)  # needs NVML open
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
        cc_data = self._stop_codecarbon()

        self.result = PhaseMetrics(
            phase=self.phase,
            energy=self._energy_metrics(gpu_kwh, gpu_source, per_device, cc_data),
            throughput=self._throughput_metrics(t1 - self._t0),
            power_samples_w=self._power_curve(),
        )

    # -- sampling ----------------------------------------------------------------------------

    def _sample_loop(self) -> None:
        while not self._stop.wait(self.sample_interval_s):
            self._sample()

    def _read_energy(self) -> list[tuple[int | None, str | None]]:
        return [_nvml_energy_mj(self._nvml, gpu.handle) if gpu.readable else (None, None)
                for gpu in self._gpus]

    def _sample(self) -> None:
        if any(gpu.readable for gpu in self._gpus):
            watts: list[float | None] = []
            for slot, gpu in enumerate(self._gpus):
                reading, error = _nvml_power_w(self._nvml, gpu.handle) if gpu.readable else (
                    None, None)
                if error is not None:
                    self._power_errors[slot] = error
                watts.append(reading)
            self._power.append((time.perf_counter(), watts))
        if self._rapl is not None:
            self._rapl.poll()

    # -- NVML --------------------------------------------------------------------------------

    def _open_nvml(self) -> None:
        ordinals = run_cuda_ordinals(self.device)
        if not ordinals:
            self._nvml_error = "none"  # a CPU run: no GPU of its own to charge
            return
        if pynvml is None:
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self._nvml_error = f"unavailable: {type(exc).__name__}"
            return
        self._nvml = pynvml
        try:
            self._gpus = run_gpus(pynvml, ordinals, os.environ.get("CUDA_VISIBLE_DEVICES"))
        except pynvml.NVMLError as exc:
            self._nvml_error = f"unavailable: GPU enumeration failed ({type(exc).__name__})"
            return

    def _gpu_energy(
        self, energy_end: list[int | None]
    ) -> tuple[float | None, str, list[dict[str, Any]]]:
        """Per-device energy (counter, else power integral) and their sum."""
        if not self._gpus:
            return None, self._nvml_error, []
        per_device = [self._device_energy(slot, gpu, energy_end[slot])
                      for slot, gpu in enumerate(self._gpus)]
        missing = [d for d in per_device if d["kwh"] is None]
        if missing:
            # A partial sum would silently under-report; say which GPU is missing, and why.
            if len(missing) == len(per_device) and len({d["source"] for d in missing}) == 1:
                return None, missing[0]["source"], per_device
            why = "; ".join(f"cuda:{d['cuda']} {d['source'].removeprefix('unavailable: ')}"
                            for d in missing)
            return None, f"unavailable: no reading for {why}", per_device
        sources = {d["source"] for d in per_device}
        # Mixed counters and power integrals: report the less precise of the two.
        source = sources.pop() if len(sources) == 1 else "measured:nvml-power-samples"
        return sum(d["kwh"] for d in per_device), source, per_device

    def _device_energy(self, slot: int, gpu: RunGpu,
                       end: tuple[int | None, str | None]) -> dict[str, Any]:
        """One GPU's energy: the counter's delta, else the integral of its sampled power."""
        entry: dict[str, Any] = {"cuda": gpu.cuda, "index": gpu.index, "uuid": gpu.uuid,
                                 "name": "unknown", "kwh": None, "source": gpu.unavailable}
        if gpu.handle is not None:
            with contextlib.suppress(self._nvml.NVMLError):
                entry["name"] = _text(self._nvml.nvmlDeviceGetName(gpu.handle))
        if not gpu.readable:
            return entry
        (start, start_error), (stop, stop_error) = self._energy_start[slot], end
        if start is not None and stop is not None:
            entry["kwh"], entry["source"] = (stop - start) / _MJ_PER_KWH, "measured:nvml"
            return entry
        entry["kwh"] = _trapezoid_kwh(self._power, slot)
        if entry["kwh"] is not None:
            entry["source"] = "measured:nvml-power-samples"
        else:
            counter = start_error or stop_error
            power = self._power_errors.get(slot, "too few readings")
            entry["source"] = f"unavailable: energy counter {counter}, power {power}"
        return entry

    def _power_curve(self) -> list[list[float]]:
        stride = max(1, math.ceil(len(self._power) / self.max_power_samples))
        return [
            [round(t - self._t0, 3), round(sum(w for w in watts if w is not None), 1)]
            for t, watts in self._power[::stride]
        ]

    # -- CodeCarbon --------------------------------------------------------------------------

    def _start_codecarbon(self) -> None:
        try:
            # Imported here: it is slow to import and only needed when metering with it.
            from codecarbon import OfflineEmissionsTracker, OutputMethod

            # log_level="error" only applies after CodeCarbon's own init messages are logged.
            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            output_methods: list[OutputMethod] = []
            output_dir = "."
            if self.codecarbon_dir is not None:
                self.codecarbon_dir.mkdir(parents=True, exist_ok=True)
                output_methods = [OutputMethod.CSV]
                output_dir = str(self.codecarbon_dir)
            tracker = OfflineEmissionsTracker(
                country_iso_code=self.country_iso_code,
                project_name=f"hydrabench-{self.phase}",
                measure_power_secs=self.codecarbon_interval_s,
                output_methods=output_methods,
                output_dir=output_dir,
                log_level="error",
            )
            tracker.start()
        # Metering is auxiliary: whatever breaks CodeCarbon is recorded, never fatal to a run.
        except Exception as exc:
            self._codecarbon_error = (
                f"unavailable: codecarbon failed to start ({type(exc).__name__}: {exc})"
            )
            return
        self._tracker = tracker

    def _stop_codecarbon(self) -> Any:
        """CodeCarbon's EmissionsData, or None (with the reason recorded)."""
        if self._tracker is None:
            return None
        try:
            self._tracker.stop()
        except Exception as exc:
            self._codecarbon_error = f"unavailable: codecarbon failed ({type(exc).__name__})"
            return None
        # CodeCarbon swallows its own exceptions, so a failure only shows as missing data.
        data = getattr(self._tracker, "final_emissions_data", None)
        if data is None:
            self._codecarbon_error = "unavailable: codecarbon produced no data"
        return data

    # -- assembly ----------------------------------------------------------------------------

    def _energy_metrics(
        self,
        gpu_kwh: float | None,
        gpu_source: str,
        per_device: list[dict[str, Any]],
        cc_data: Any,
    ) -> EnergyMetrics:
        if self._rapl is not None and self._rapl.available:
            cpu_kwh: float | None = self._rapl.kwh
            cpu_source = "measured:rapl"
        elif cc_data is not None:
            cpu_kwh, cpu_source = float(cc_data.cpu_energy), "estimated:codecarbon"
        else:
            cpu_kwh, cpu_source = None, self._codecarbon_error
        if cc_data is not None:
            ram_kwh: float | None = float(cc_data.ram_energy)
            ram_source = "estimated:codecarbon"
        else:
            ram_kwh, ram_source = None, self._codecarbon_error

        components = [(gpu_kwh, gpu_source), (cpu_kwh, cpu_source), (ram_kwh, ram_source)]
        known = [(kwh, source) for kwh, source in components if kwh is not None]
        total_kwh = sum(kwh for kwh, _ in known) if known else None

        # CO2 = our total x CodeCarbon's grid intensity, so that co2eq_kg / total_kwh is the
        # country's intensity even where our GPU/RAPL figures differ from CodeCarbon's own.
        co2eq_kg: float | None = None
        co2_source = self._codecarbon_error
        if cc_data is not None and total_kwh is not None:
            if cc_data.energy_consumed > 0:
                co2eq_kg = total_kwh * cc_data.emissions / cc_data.energy_consumed
                co2_source = "estimated:codecarbon"
            else:
                co2_source = "unavailable: codecarbon reported no energy to derive intensity"

        return EnergyMetrics(
            gpu_kwh=gpu_kwh,
            gpu_source=gpu_source,
            gpu_per_device=per_device,
            cpu_kwh=cpu_kwh,
            cpu_source=cpu_source,
            ram_kwh=ram_kwh,
            ram_source=ram_source,
            total_kwh=total_kwh,
            co2eq_kg=co2eq_kg,
            co2_source=co2_source,
            energy_measured=bool(known) and all(_is_measured(s) for _, s in known),
        )

    def _throughput_metrics(self, wall_s: float) -> ThroughputMetrics:
        times = sorted(self._step_times)
        if _cuda_in_use():
            peak, peak_source = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
        else:
            # Peak RSS over the process lifetime (not resettable per phase); KiB on Linux.
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = maxrss if sys.platform == "darwin" else maxrss * 1024
            peak_source = "peak_rss"
        metrics = ThroughputMetrics(
            wall_s=wall_s,
            steps=len(times),
            tokens=self._tokens,
            samples=self._samples,
            tokens_per_s=_rate(self._tokens, wall_s),
            samples_per_s=_rate(self._samples, wall_s),
            step_time_mean_s=sum(times) / len(times) if times else None,
            step_time_p50_s=_percentile(times, 0.5) if times else None,
            step_time_p95_s=_percentile(times, 0.95) if times else None,
            peak_memory_bytes=int(peak),
            peak_memory_source=peak_source,
        )
        if self._eval is not None:
            metrics.requests = self._eval["requests"]
            metrics.prompt_tokens = self._eval["prompt_tokens"]
            metrics.generated_tokens = self._eval["generated_tokens"]
            metrics.requests_per_s = _rate(metrics.requests, wall_s)
            metrics.prompt_tokens_per_s = _rate(metrics.prompt_tokens, wall_s)
            metrics.generated_tokens_per_s = _rate(metrics.generated_tokens, wall_s)
        return metrics
