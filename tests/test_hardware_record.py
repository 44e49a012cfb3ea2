"""Records name the machine a number came from: CPU, thread counts and the BLAS (issue 31)."""

import pytest
import torch

from hydrabench.training import metering


def test_hardware_summary_names_threads_blas_and_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = metering.hardware_summary()
    finally:
        torch.set_num_threads(before)
    assert summary["torch_threads"] == 1  # what this process computes with, not the core count
    assert summary["torch_interop_threads"] == torch.get_num_interop_threads() >= 1
    assert summary["omp_num_threads"] == "3" and summary["mkl_num_threads"] is None
    assert summary["cpu_model"] and summary["logical_cores"] >= 1
    # Every torch wheel links a BLAS and its build line names it (mkl, open, ...).
    assert summary["blas"] and summary["blas"] in torch.__config__.show()
    assert summary["lapack"]
    assert summary["cpu_capability"] == torch.backends.cpu.get_cpu_capability() != ""


def test_build_libraries_parsed_from_torch_config() -> None:
    config = ("  - Build settings: BLAS_INFO=open, BUILD_TYPE=Release, CXX_FLAGS= -O2, "
              "LAPACK_INFO=open, TORCH_VERSION=2.5.0, USE_CUDA=0,")
    assert metering.torch_build_libraries(config) == {"blas": "open", "lapack": "open"}
    assert metering.torch_build_libraries("PyTorch built with:\n  - GCC 9.3\n") == {
        "blas": None, "lapack": None}
