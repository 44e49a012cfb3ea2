"""Tests for hydrabench.training.metering: one real Meter run on this machine, fakes for
hardware."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
import torch

from hydrabench.training import metering
from hydrabench.training.metering import Meter, PhaseMetrics, RaplReader, rapl_delta_uj

STEPS = 4
BATCH = 8
PAD_ID = 0
# The real run's device: on a GPU box it runs there and the meter reads CUDA's allocator; on a
# CPU machine the process's peak RSS.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rapl_readable(root: Path = metering.RAPL_ROOT) -> bool:
    """Whether any top-level RAPL counter can be read, checked independently of the module."""
    for energy in root.glob("intel-rapl:*/energy_uj"):
        if re.fullmatch(r"intel-rapl:\d+", energy.parent.name):
            try:
                energy.read_text()
            except OSError:
                continue
            return True
    return False


class FakeNvml:
    """Stand-in for the pynvml module, with `count` GPUs that share the same behaviour.

    Like NVML, device queries fail outside nvmlInit()/nvmlShutdown().
    """

    NVMLError = pynvml.NVMLError

    def __init__(
        self,
        count: int = 1,
        energy_mj: list[int] | None = None,
        power_mw: int = 300_000,
        init_error: int | None = None,
    ) -> None:
        self.count = count
        self.energy_mj = energy_mj
        self.power_mw = power_mw
        self.init_error = init_error
        self.energy_reads: dict[int, int] = {}
        self.initialised = False
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False
        self.shutdowns += 1

    def _check(self) -> None:
        if not self.initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._check()
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle:04d}-fake"

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        self._check()
        return b"Fake GPU"  # bytes, as older pynvml releases return

    def nvmlSystemGetDriverVersion(self) -> str:
        return "999.1"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(total=80 * 2**30)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        self._check()
        if self.energy_mj is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)  # as on pre-Volta GPUs
        reads = self.energy_reads.get(handle, 0)
        self.energy_reads[handle] = reads + 1
        return self.energy_mj[min(reads, len(self.energy_mj) - 1)]

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        self._check()
        return self.power_mw


@pytest.fixture
def no_rapl(tmp_path: Path) -> Path:
    """An empty powercap root, so CPU energy does not depend on the host's RAPL."""
    root = tmp_path / "powercap"
    root.mkdir()
    return root


def _metered_sleep(seconds: float, **kwargs: Any) -> PhaseMetrics:
    with Meter(phase="test", use_codecarbon=False, **kwargs) as meter:
        time.sleep(seconds)
        meter.step(tokens=10, samples=1)
    assert meter.result is not None
    return meter.result


# --------------------------------------------------------------------------------------------
# One real run on this machine (CodeCarbon costs ~1.6 s to start, so it is shared).


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhaseMetrics, Path]:
    codecarbon_dir = tmp_path_factory.mktemp("codecarbon")
    model = torch.nn.Sequential(torch.nn.Embedding(100, 32), torch.nn.Linear(32, 100)).to(DEVICE)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    with Meter(phase="train", country_iso_code="USA", codecarbon_dir=codecarbon_dir) as meter:
        for step in range(STEPS):
            batch = torch.randint(1, 100, (BATCH, 64), device=DEVICE)
            batch[:, 60 - step :] = PAD_ID  # ragged padding, as in a real batch
            loss = torch.nn.functional.cross_entropy(
                model(batch).flatten(0, 1), batch.flatten(), ignore_index=PAD_ID
            )
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
            time.sleep(0.05)  # long enough for CodeCarbon to attribute non-zero energy
            meter.step(tokens=int((batch != PAD_ID).sum()), samples=BATCH)
        meter.add_eval(requests=3, prompt_tokens=120, generated_tokens=30)
    assert meter.result is not None
    return meter.result, codecarbon_dir


def test_real_throughput_is_consistent(real_run: tuple[PhaseMetrics, Path]) -> None:
    tp = real_run[0].throughput
    expected_tokens = sum(BATCH * (60 - step) for step in range(STEPS))
    assert (tp.steps, tp.tokens, tp.samples) == (STEPS, expected_tokens, STEPS * BATCH)
    assert tp.wall_s > 0
    assert tp.tokens_per_s == pytest.approx(tp.tokens / tp.wall_s)
    assert tp.samples_per_s == pytest.approx(tp.samples / tp.wall_s)
    assert 0 < tp.step_time_p50_s <= tp.step_time_p95_s
    # Step intervals tile the phase up to the time after the last step.
    assert tp.step_time_mean_s * tp.steps <= tp.wall_s
    assert tp.requests_per_s == pytest.approx(3 / tp.wall_s)
    assert tp.prompt_tokens_per_s == pytest.approx(120 / tp.wall_s)
    assert tp.generated_tokens_per_s == pytest.approx(30 / tp.wall_s)
    if DEVICE == "cuda":  # the allocator's peak: at least the weights and their gradients
        assert tp.peak_memory_source == "cuda_max_memory_allocated"
        assert tp.peak_memory_bytes >= 2 * 4 * (100 * 32 + 32 * 100 + 100)
    else:
        assert tp.peak_memory_source == "peak_rss"
        assert tp.peak_memory_bytes > 1024 * 1024  # KiB converted to bytes


def test_real_cpu_and_ram_energy(real_run: tuple[PhaseMetrics, Path]) -> None:
    energy = real_run[0].energy
    assert energy.cpu_kwh is not None and energy.cpu_kwh > 0
    expected = "measured:rapl" if _rapl_readable() else "estimated:codecarbon"
    assert energy.cpu_source == expected
    assert energy.ram_source == "estimated:codecarbon"
    # The RAM estimate alone makes the phase not fully measured.
    assert energy.energy_measured is False
    assert energy.co2_source == "estimated:codecarbon"
    assert energy.co2eq_kg is not None and energy.co2eq_kg > 0
    assert energy.total_kwh == pytest.approx(
        sum(kwh for kwh in (energy.gpu_kwh, energy.cpu_kwh, energy.ram_kwh) if kwh is not None)
    )
    assert list(real_run[1].glob("*.csv")), "CodeCarbon should write into codecarbon_dir"


def test_real_gpu_energy(real_run: tuple[PhaseMetrics, Path]) -> None:
    energy = real_run[0].energy
    if DEVICE == "cpu":  # a CPU run is charged no GPU energy, whatever GPUs the node has
        assert (energy.gpu_kwh, energy.gpu_source, energy.gpu_per_device) == (None, "none", [])
    elif metering.gpu_inventory():
        assert energy.gpu_source.startswith("measured:")
    else:
        assert energy.gpu_kwh is None
        assert energy.gpu_source.startswith("unavailable:")


def test_real_result_is_json_serialisable(real_run: tuple[PhaseMetrics, Path]) -> None:
    data = json.loads(json.dumps(real_run[0].to_dict(), allow_nan=False))
    assert data["phase"] == "train"
    assert set(data) == {"phase", "energy", "throughput", "power_samples_w"}
    assert {"gpu_kwh", "cpu_source", "total_kwh", "co2eq_kg", "energy_measured"} <= set(
        data["energy"]
    )


# --------------------------------------------------------------------------------------------
# NVML branches. No GPU exists on the test machine, so NVML is replaced by FakeNvml.


def test_nvml_init_failure_falls_back_cleanly(
    monkeypatch: pytest.MonkeyPatch, no_rapl: Path
) -> None:
    """Without a driver nvmlInit raises; the phase still completes, with reasons recorded."""
    fake = FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    monkeypatch.setattr(metering, "pynvml", fake)
    # A CUDA run (named: no CUDA exists here to infer it from) whose NVML cannot start.
    result = _metered_sleep(0.01, rapl_root=no_rapl, device="cuda")
    energy = result.energy
    assert energy.gpu_kwh is None
    assert energy.gpu_source == "unavailable: NVMLError_LibraryNotFound"
    assert energy.cpu_kwh is None and energy.cpu_source == "unavailable: codecarbon disabled"
    assert energy.total_kwh is None and energy.energy_measured is False
    assert result.power_samples_w == []
    assert result.throughput.requests is None  # add_eval never called
    assert metering.gpu_inventory() == []


def test_nvml_energy_counter(monkeypatch: pytest.MonkeyPatch, no_rapl: Path) -> None:
    """Mocked NVML (no GPU here): the counter delta, 1000 -> 4600000 mJ, becomes the energy."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeNvml(energy_mj=[1000, 4_600_000])
    monkeypatch.setattr(metering, "pynvml", fake)
    energy = _metered_sleep(0.01, rapl_root=no_rapl, device="cuda").energy
    assert energy.gpu_kwh == pytest.approx(4_599_000 / 3.6e9)
    assert energy.gpu_source == "measured:nvml"
    assert energy.gpu_per_device == [
        {"cuda": 0, "index": 0, "uuid": "GPU-0000-fake", "name": "Fake GPU",
         "kwh": energy.gpu_kwh, "source": "measured:nvml"}
    ]
    # Only measured components are known (CodeCarbon off, no RAPL), so the phase is measured.
    assert energy.total_kwh == energy.gpu_kwh and energy.energy_measured is True
    assert fake.shutdowns == 1


def test_nvml_power_samples_fallback(monkeypatch: pytest.MonkeyPatch, no_rapl: Path) -> None:
    """Mocked NVML (no GPU here) without an energy counter: power is integrated instead."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(metering, "pynvml", FakeNvml(power_mw=250_000))
    result = _metered_sleep(0.2, rapl_root=no_rapl, sample_interval_s=0.02, device="cuda")
    assert result.energy.gpu_source == "measured:nvml-power-samples"
    expected_kwh = 250 * result.throughput.wall_s / 3.6e6
    assert result.energy.gpu_kwh == pytest.approx(expected_kwh, rel=0.1)
    assert len(result.power_samples_w) >= 3
    assert all(watts == 250.0 for _, watts in result.power_samples_w)


def test_power_curve_is_capped(monkeypatch: pytest.MonkeyPatch, no_rapl: Path) -> None:
    """Mocked NVML (no GPU here): a long curve is downsampled to max_power_samples."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(metering, "pynvml", FakeNvml(energy_mj=[0, 1000]))
    result = _metered_sleep(0.1, rapl_root=no_rapl, sample_interval_s=0.001, max_power_samples=5,
                            device="cuda")
    assert 1 <= len(result.power_samples_w) <= 5


def test_cuda_visible_devices_selects_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mocked NVML (no GPU here) with 3 GPUs: only the ones CUDA may use are inventoried."""
    monkeypatch.setattr(metering, "pynvml", FakeNvml(count=3))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-0000")  # UUID prefixes are allowed
    assert [gpu["index"] for gpu in metering.gpu_inventory()] == [2, 0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,bogus,0")  # CUDA stops at a bad entry
    assert [gpu["index"] for gpu in metering.gpu_inventory()] == [1]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    inventory = metering.gpu_inventory()
    assert len(inventory) == 3
    assert inventory[0] == {
        "index": 0,
        "name": "Fake GPU",
        "memory_total_bytes": 80 * 2**30,
        "driver": "999.1",
    }


# --------------------------------------------------------------------------------------------
# RAPL, on a temporary directory laid out like /sys/class/powercap.


def _write_zone(root: Path, zone: str, name: str, energy_uj: int, max_uj: int = 1000) -> Path:
    path = root / zone
    path.mkdir(parents=True)
    (path / "name").write_text(f"{name}\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


def test_rapl_delta_wraps_around() -> None:
    assert rapl_delta_uj(100, 150, 1000) == 50
    assert rapl_delta_uj(900, 100, 1000) == 200


def test_rapl_reader_accumulates_across_wrap(tmp_path: Path) -> None:
    package = _write_zone(tmp_path, "intel-rapl:0", "package-0", energy_uj=900)
    # A subzone and a platform zone: both already inside the package and must be skipped.
    _write_zone(tmp_path, "intel-rapl:0:0", "core", energy_uj=5)
    _write_zone(tmp_path, "intel-rapl:1", "psys", energy_uj=5)
    reader = RaplReader(tmp_path)
    assert reader.available and reader.zones == [package]
    reader.start()
    (package / "energy_uj").write_text("100\n")  # wrapped past max_energy_range_uj
    reader.poll()
    assert reader.total_uj == 200
    (package / "energy_uj").write_text("150\n")
    reader.poll()
    assert reader.total_uj == 250
    assert reader.kwh == pytest.approx(250 / 3.6e12)


def test_rapl_missing_is_unavailable(no_rapl: Path) -> None:
    reader = RaplReader(no_rapl)
    assert not reader.available
    assert reader.error is not None and reader.error.startswith("unavailable:")


def test_meter_uses_rapl_when_readable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(metering, "pynvml", FakeNvml(init_error=pynvml.NVML_ERROR_UNINITIALIZED))
    _write_zone(tmp_path, "intel-rapl:0", "package-0", energy_uj=10)
    energy = _metered_sleep(0.01, rapl_root=tmp_path).energy
    assert energy.cpu_source == "measured:rapl"
    assert energy.cpu_kwh == 0.0  # the fake counter did not move
    assert energy.energy_measured is True


# --------------------------------------------------------------------------------------------
# Overhead and provenance


def test_step_overhead_is_tiny(monkeypatch: pytest.MonkeyPatch, no_rapl: Path) -> None:
    monkeypatch.setattr(metering, "pynvml", FakeNvml(init_error=pynvml.NVML_ERROR_UNINITIALIZED))
    n = 20_000
    with Meter(phase="overhead", use_codecarbon=False, rapl_root=no_rapl) as meter:
        start = time.perf_counter()
        for _ in range(n):
            meter.step(tokens=1, samples=1)
        per_step = (time.perf_counter() - start) / n
    # 1% of even a 1 ms step is 10 us; a perf_counter read and an append take well under.
    assert per_step < 10e-6
    assert meter.result is not None and meter.result.throughput.steps == n


def test_hardware_summary() -> None:
    summary = metering.hardware_summary()
    assert summary["cpu_model"]
    assert summary["logical_cores"] >= 1
    assert summary["ram_total_bytes"] > 0
    assert isinstance(summary["gpus"], list)
    assert summary["torch_cuda_available"] == torch.cuda.is_available()
    json.dumps(summary)
