"""`hydrabench doctor`: torch's CUDA build, the driver, vLLM and the plugin, and a driver too old
for the build named in one line. No NVIDIA driver exists here: the driver's CUDA version is given
to the pure functions directly, as NVML would report it."""

from pathlib import Path

import pytest

from hydrabench import doctor


@pytest.mark.parametrize(("torch_cuda", "driver_cuda", "expected"), [
    ("12.8", "12.8", None),
    ("12.4", "13.0", None),              # a newer driver runs older builds
    (None, "12.4", None),                # CPU build: no driver needed
    ("12.8", None, None),                # no driver: torch says so itself (is_available False)
    ("13.0", "12.8", "update the driver, or install a torch built for CUDA 12.x"),
    ("12.8", "12.2", "minor-version compatibility"),
])
def test_driver_problem(torch_cuda: str | None, driver_cuda: str | None,
                        expected: str | None) -> None:
    problem = doctor.driver_problem(torch_cuda, driver_cuda)
    assert problem is None if expected is None else expected in problem


def test_cuda_lines_name_the_build_the_driver_and_the_problem() -> None:
    lines = doctor.cuda_lines("13.0", False, "12.8", "570.86.10")
    assert lines[0] == "torch cuda  CUDA 13.0 build, torch.cuda.is_available() = False"
    assert lines[1] == "driver      570.86.10 (runs CUDA up to 12.8)"
    assert lines[2].startswith("PROBLEM     the NVIDIA driver runs CUDA up to 12.8")
    assert doctor.cuda_lines(None, False, None, None) == [
        "torch cuda  CPU build, torch.cuda.is_available() = False",
        "driver      none (no NVIDIA driver found by NVML)"]


def test_report_shows_cuda_vllm_and_the_registered_plugin() -> None:
    lines = {line[:12].strip(): line[12:] for line in doctor.report()}
    assert lines["torch cuda"].startswith(("CPU build", "CUDA "))
    assert lines["plugin"].startswith("hydrabench_hydralora, hydrabench 0.")
    assert "driver" in lines and "vllm" in lines


def test_report_names_where_results_and_reports_go(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Both roots absolute, as set (a relative root depends on the current directory)."""
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "r"))
    monkeypatch.setenv("HYDRABENCH_REPORTS", "tables")
    monkeypatch.chdir(tmp_path)
    lines = {line[:12].strip(): line[12:] for line in doctor.report()}
    assert (lines["results"], lines["reports"]) == (str(tmp_path / "r"), str(tmp_path / "tables"))
