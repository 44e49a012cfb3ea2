"""Device choices follow the run's device (or the model's), never what the machine happens to have.

No CUDA exists on the test machine: where a choice depends on CUDA, `torch.cuda` is faked with
monkeypatch (said in each test), and the meta device stands in for "a device other than the
CPU" where a model must run on one.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from hydrabench.methods.hydralora_layer import (
    HydraLoraConfig,
    apply_hydralora,
    mean_router_gates,
    model_device,
)
from hydrabench.training import distributed
from hydrabench.training import loop as train


class _Tiny(nn.Module):
    """The smallest model HydraLoRA adapts: embedding, one target linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.emb(input_ids))


def _fake_cuda(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Fake CUDA (none exists here): `is_available` says yes, and every CUDA call this module's
    code could make is recorded instead of run, so a test sees whether CUDA was touched."""
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def record(name: str, result: Any = None):
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, args))
            return result
        return call

    monkeypatch.setattr(torch.cuda, "set_device", record("set_device"))
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        record("get_rng_state", torch.zeros(16, dtype=torch.uint8)))
    monkeypatch.setattr(torch.cuda, "set_rng_state", record("set_rng_state"))
    return calls


# ----------------------------------------------------------------------- merges (router-mean)


def test_router_mean_gates_run_on_the_models_device() -> None:
    """A model whose parameters are on the meta device stands in for a CUDA model (no CUDA
    here): the tokenizer's CPU batches must be moved to it, or the forward fails ("Tensor on
    device meta is not on the expected device cpu") as a CUDA model's would."""
    model = apply_hydralora(_Tiny(), HydraLoraConfig(r=2, num_heads=3, target_modules=("proj",)))
    model.to("meta")
    assert model_device(model) == torch.device("meta")
    batches = [torch.tensor([[1, 2, 3]]), {"input_ids": torch.tensor([[4, 5]])}]
    gates = mean_router_gates(model, batches)
    assert list(gates) == ["proj"]
    assert gates["proj"].device == torch.device("meta") and gates["proj"].shape == (3,)


def test_router_mean_gates_on_cpu_are_a_distribution() -> None:
    """On the CPU (the model's device) the mean gate is still each head's mean weight."""
    torch.manual_seed(0)
    model = apply_hydralora(_Tiny(), HydraLoraConfig(r=2, num_heads=3, target_modules=("proj",)))
    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    gates = mean_router_gates(model, [batch])
    assert gates["proj"].device == torch.device("cpu")
    assert float(gates["proj"].sum()) == pytest.approx(1.0)


# ----------------------------------------------------------------------- process group


@pytest.mark.parametrize("device, backend", [("cpu", "gloo"), ("cuda:1", "nccl")])
def test_process_group_backend_from_the_runs_device(
        monkeypatch: pytest.MonkeyPatch, device: str, backend: str) -> None:
    """Fake CUDA (none exists here) that says it is available: a CPU run (the tiny profile is
    `device: cpu`) must still join with gloo and leave CUDA alone; a CUDA run joins with NCCL on
    its LOCAL_RANK's GPU."""
    calls = _fake_cuda(monkeypatch)
    joined: list[str] = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", joined.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    distributed.init_if_launched(device)
    assert joined == [backend]
    assert calls == ([] if device == "cpu" else [("set_device", (1,))])


def test_single_process_joins_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda *a: pytest.fail("no process group without torchrun"))
    distributed.init_if_launched("cuda")


def test_ddp_device_ids_from_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake CUDA (none exists here) and a fake DDP that records its arguments: a CPU model is
    wrapped without device_ids even where CUDA is available (DDP refuses a GPU for a CPU model)."""
    _fake_cuda(monkeypatch)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    wrapped: list[Any] = []
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda model, device_ids: wrapped.append(device_ids) or model)
    model = nn.Linear(2, 2)
    forward, owner = distributed.prepare(model, None)
    assert wrapped == [None] and forward is model and owner is model


# ----------------------------------------------------------------------- random state


def test_cpu_run_rng_state_never_touches_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake CUDA (none exists here) that is "available" and fails on any use: a CPU run's
    checkpoint state and its restore stay on the CPU generator."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def no_cuda(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a CPU run touched CUDA")

    monkeypatch.setattr(torch.cuda, "get_rng_state", no_cuda)
    monkeypatch.setattr(torch.cuda, "set_rng_state", no_cuda)
    torch.manual_seed(3)
    state = train._rng_state("cpu")
    assert set(state) == {"cpu"}
    expected = torch.rand(4)
    # A checkpoint a GPU run wrote (with a CUDA state) resumed by a CPU run: CPU state only.
    train._restore_rng({**state, "cuda": torch.zeros(16, dtype=torch.uint8)}, "cpu")
    assert torch.equal(torch.rand(4), expected)


def test_cuda_run_rng_state_includes_its_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake CUDA (none exists here) recording calls: a CUDA run saves and restores its own
    GPU's generator (the device it names, not whichever is current)."""
    calls = _fake_cuda(monkeypatch)
    state = train._rng_state("cuda:1")
    assert set(state) == {"cpu", "cuda"}
    train._restore_rng(state, "cuda:1")
    assert [name for name, _ in calls] == ["get_rng_state", "set_rng_state"]
    assert calls[0][1] == ("cuda:1",) and calls[1][1][1] == "cuda:1"
