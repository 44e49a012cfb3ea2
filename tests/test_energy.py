"""GPU energy charged to a run: only the run's GPUs, matched by UUID, every gap labelled.

No GPU exists on the test machine, so NVML is replaced by `FakeNode` (a node of GPUs with their
UUIDs, counters, MIG modes and permission errors), and where CUDA must name a device's UUID,
`torch.cuda` is faked too (`_cuda_names`). Each test says which fake it uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
import torch

from hydrabench.training import metering
from hydrabench.training.metering import Meter, PhaseMetrics

_MJ_PER_KWH = 3.6e9


def _uuid(index: int) -> str:
    return f"GPU-{index:08x}-aaaa-bbbb-cccc-{index:012x}"


class FakeNode:
    """Stand-in for the pynvml module on a node of `count` GPUs.

    `energy[i]`: GPU i's successive counter readings (mJ; the last one repeats); `errors[i]`: the
    NVML error code every energy and power query of GPU i raises; `mig`: GPUs in MIG mode.
    """

    NVMLError = pynvml.NVMLError

    def __init__(self, count: int = 8, energy: dict[int, list[int]] | None = None,
                 errors: dict[int, int] | None = None, mig: set[int] | None = None) -> None:
        self.count = count
        self.energy = energy or {}
        self.errors = errors or {}
        self.mig = mig or set()
        self.reads: dict[int, int] = {}
        self.inits = 0

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return _uuid(handle)

    def nvmlDeviceGetName(self, handle: int) -> str:
        return f"Fake GPU {handle}"

    def nvmlDeviceGetMigMode(self, handle: int) -> list[int]:
        return [1, 1] if handle in self.mig else [0, 0]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        if handle in self.errors:
            raise pynvml.NVMLError(self.errors[handle])
        readings = self.energy.get(handle)
        if readings is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        read = self.reads.get(handle, 0)
        self.reads[handle] = read + 1
        return readings[min(read, len(readings) - 1)]

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        if handle in self.errors:
            raise pynvml.NVMLError(self.errors[handle])
        return 100_000


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> FakeNode:
    """A fake 8-GPU node (no GPU here), every GPU's counter rising by (index + 1) × 3.6e6 mJ
    (index + 1 Wh) over a phase; CUDA_VISIBLE_DEVICES and torchrun's variables unset."""
    fake = FakeNode(energy={i: [1000 * i, 1000 * i + (i + 1) * 3_600_000] for i in range(8)})
    monkeypatch.setattr(metering, "pynvml", fake)
    for name in ("CUDA_VISIBLE_DEVICES", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return fake


def _cuda_names(monkeypatch: pytest.MonkeyPatch, uuids: list[str]) -> None:
    """Fake CUDA (none exists here): this process sees len(uuids) devices, CUDA device k being
    the GPU with UUID uuids[k] (torch writes it without NVML's "GPU-" prefix)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def properties(ordinal: int) -> SimpleNamespace:
        assert 0 <= ordinal < len(uuids), "Invalid device id"
        return SimpleNamespace(uuid=uuids[ordinal].removeprefix("GPU-"))

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)


def _phase(tmp_path: Path, device: str | None) -> PhaseMetrics:
    rapl = tmp_path / "no-rapl"
    rapl.mkdir(exist_ok=True)
    with Meter(phase="train", use_codecarbon=False, rapl_root=rapl, device=device,
               sample_interval_s=60) as meter:
        meter.step(tokens=1, samples=1)
    assert meter.result is not None
    return meter.result


def _wh(kwh: float | None) -> float:
    assert kwh is not None
    return kwh * 1000


# ----------------------------------------------------------------------- which GPUs


def test_cpu_run_on_a_gpu_node_charges_no_gpu(node: FakeNode, tmp_path: Path) -> None:
    """Fake 8-GPU node: a CPU run says `none` and never opens NVML."""
    energy = _phase(tmp_path, "cpu").energy
    assert (energy.gpu_kwh, energy.gpu_source, energy.gpu_per_device) == (None, "none", [])
    assert node.inits == 0


def test_unnamed_device_is_the_cpu_while_cuda_is_untouched(node: FakeNode,
                                                           tmp_path: Path) -> None:
    """Fake 8-GPU node: a caller that names no device, in a process that never initialised
    CUDA (none exists here), ran on the CPU."""
    assert _phase(tmp_path, None).energy.gpu_source == "none"


def test_one_gpu_run_on_an_eight_gpu_node_is_charged_for_one(node: FakeNode,
                                                            tmp_path: Path) -> None:
    """Fake 8-GPU node, CUDA_VISIBLE_DEVICES unset: only cuda:3's counter delta (4 Wh) counts,
    not the node's 36 Wh."""
    energy = _phase(tmp_path, "cuda:3").energy
    assert energy.gpu_source == "measured:nvml"
    assert _wh(energy.gpu_kwh) == pytest.approx(4.0)
    assert energy.gpu_per_device == [
        {"cuda": 3, "index": 3, "uuid": _uuid(3), "name": "Fake GPU 3",
         "kwh": pytest.approx(0.004), "source": "measured:nvml"}]


def test_torchrun_charges_every_local_process_gpu(node: FakeNode, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake 8-GPU node, two torchrun processes on it: rank 0's record sums both GPUs' deltas
    (1 Wh + 2 Wh), each listed."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    energy = _phase(tmp_path, "cuda:0").energy
    assert energy.gpu_source == "measured:nvml"
    assert _wh(energy.gpu_kwh) == pytest.approx(3.0)
    assert [(d["cuda"], _wh(d["kwh"])) for d in energy.gpu_per_device] == [
        (0, pytest.approx(1.0)), (1, pytest.approx(2.0))]


def test_visible_devices_by_index_are_matched_by_cudas_uuid(
        node: FakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake 8-GPU node and fake CUDA: CUDA_VISIBLE_DEVICES=2 where CUDA's order (fastest first)
    differs from NVML's, so CUDA's device 2 is NVML's 6. The UUID decides, not the index."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    _cuda_names(monkeypatch, [_uuid(6)])
    energy = _phase(tmp_path, "cuda").energy
    assert [(d["cuda"], d["index"], d["uuid"]) for d in energy.gpu_per_device] == [
        (0, 6, _uuid(6))]
    assert _wh(energy.gpu_kwh) == pytest.approx(7.0)


def test_visible_devices_by_uuid(node: FakeNode, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake 8-GPU node, no CUDA here to name UUIDs: CUDA_VISIBLE_DEVICES's UUID prefixes pick
    NVML's devices by UUID (cuda:1 is the second entry, NVML's 2); a bare integer, with
    nothing better to go on, is NVML's index."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-00000005,GPU-00000002")
    energy = _phase(tmp_path, "cuda:1").energy
    assert [(d["cuda"], d["index"]) for d in energy.gpu_per_device] == [(1, 2)]
    assert _wh(energy.gpu_kwh) == pytest.approx(3.0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4")
    assert [d["index"] for d in _phase(tmp_path, "cuda").energy.gpu_per_device] == [4]


def test_visible_devices_parsing() -> None:
    assert metering.visible_devices(None) is None
    assert metering.visible_devices("") == []
    assert metering.visible_devices("1, GPU-ab,MIG-cd") == ["1", "GPU-ab", "MIG-cd"]
    assert metering.visible_devices("1,bogus,0") == ["1"]  # CUDA stops at a bad entry


# ----------------------------------------------------------------------- gaps, labelled


def test_a_device_nvml_cannot_find_leaves_no_partial_sum(
        node: FakeNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake 8-GPU node, two torchrun processes, fake CUDA whose second device has a UUID NVML
    does not list: the total is unavailable (a partial sum would under-report), the first
    device's reading is kept, and the record says which device is missing."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    _cuda_names(monkeypatch, [_uuid(0), "GPU-deadbeef"])
    energy = _phase(tmp_path, "cuda:0").energy
    assert energy.gpu_kwh is None
    assert energy.gpu_source == (
        "unavailable: no reading for cuda:1 NVML has no GPU for CUDA device 1 (deadbeef)")
    first, second = energy.gpu_per_device
    assert _wh(first["kwh"]) == pytest.approx(1.0) and first["source"] == "measured:nvml"
    assert (second["index"], second["kwh"]) == (None, None)


def test_no_permission_is_labelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake 1-GPU node where NVML refuses both the energy counter and power (a locked-down
    node): nothing is read, and the source says why."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(metering, "pynvml",
                        FakeNode(count=1, errors={0: pynvml.NVML_ERROR_NO_PERMISSION}))
    energy = _phase(tmp_path, "cuda").energy
    assert energy.gpu_kwh is None
    assert energy.gpu_source == ("unavailable: energy counter NVMLError_NoPermission, "
                                 "power NVMLError_NoPermission")


@pytest.mark.parametrize("case", ["mig entry", "mig uuid from cuda", "gpu in mig mode"])
def test_mig_is_labelled_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     case: str) -> None:
    """Fake 2-GPU node whose GPU 1 is partitioned (MIG); a MIG instance has no energy counter of
    its own and its parent's counts every tenant, so nothing is charged, and the record says
    MIG: whether CUDA_VISIBLE_DEVICES names the instance, fake CUDA gives its UUID, or the run's
    GPU is found in MIG mode."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    fake = FakeNode(count=2, energy={0: [0, 1], 1: [0, 1]}, mig={1})
    monkeypatch.setattr(metering, "pynvml", fake)
    if case == "mig entry":
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1234abcd")
    elif case == "mig uuid from cuda":
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        _cuda_names(monkeypatch, ["MIG-1234abcd"])  # NVML lists GPUs, not their instances
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    energy = _phase(tmp_path, "cuda:0").energy
    assert energy.gpu_kwh is None
    assert energy.gpu_source.startswith("unavailable: MIG (")
    assert [d["kwh"] for d in energy.gpu_per_device] == [None]
    assert fake.reads == {}  # neither GPU's counter was charged to the run


def test_per_device_energy_survives_the_record(node: FakeNode, tmp_path: Path) -> None:
    """Fake 8-GPU node: the phase dict a record keeps is JSON and names the source per device,
    and an older record's metering (no per-device UUIDs) still loads."""
    from hydrabench.records.store import Metering

    data = json.loads(json.dumps(_phase(tmp_path, "cuda:1").to_dict(), allow_nan=False))
    assert data["energy"]["gpu_source"] == "measured:nvml"
    assert data["energy"]["gpu_per_device"][0]["uuid"] == _uuid(1)
    assert Metering.from_dict({"train": data}).train == data
    old: dict[str, Any] = json.loads(json.dumps(data))
    old["energy"]["gpu_per_device"] = [{"index": 0, "name": "x", "kwh": 1.0,
                                         "source": "measured:nvml"}]
    assert Metering.from_dict({"train": old}).train["energy"]["gpu_per_device"][0]["index"] == 0
