"""benchmarks/gpu_check.py, the GPU acceptance check, where no GPU exists: its command line
(--help, --dry-run, the refusal without CUDA), its step runner (FAIL and SKIP recorded, the
next step run, the exit status), its report (table, files, JSON last) and the profiles its steps
run. Its steps themselves need CUDA and NVML, which cannot exist here: they are not faked; the
check is run on a GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import child_env

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_check.py"


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as the script runs: its folder first
    import gpu_check

    return gpu_check


def run_script(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The script as `make gpu-check` runs it, with CUDA hidden (child_env): these tests mean a
    machine without a GPU, also where one exists."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=child_env(**env))


def test_help_works_without_cuda(tmp_path: Path) -> None:
    result = run_script("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--dry-run" in result.stdout and "GPU acceptance check" in result.stdout


def test_dry_run_lists_steps_with_budgets_and_touches_nothing(tmp_path: Path) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    result = run_script("--dry-run", cwd=work, HYDRABENCH_RESULTS=str(tmp_path / "results"),
                        HYDRABENCH_REPORTS=str(tmp_path / "reports"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    names = ["facts", "tiny-model", "table1", "merge-gap", "bench-layer", "small", "plugin"]
    assert [line.split(" ")[1] for line in lines[:-1]] == names
    budgets = [int(line.split("(")[1].split(" s)")[0]) for line in lines[:-1]]
    assert lines[-1].startswith(f"total budget: {sum(budgets)} s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"] and not any(work.iterdir())


def test_dry_run_and_help_do_not_import_torch(tmp_path: Path) -> None:
    """torch and transformers are imported by the steps only: the plan needs neither."""
    code = (f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import gpu_check; "
            f"gpu_check.main(['--dry-run', '--steps', 'facts']); "
            f"print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env=child_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("1. facts (")
    assert result.stdout.splitlines()[-1] == "[]"


def test_refuses_in_one_line_without_cuda(tmp_path: Path) -> None:
    result = run_script(cwd=tmp_path, HYDRABENCH_RESULTS=str(tmp_path / "results"),
                        HYDRABENCH_REPORTS=str(tmp_path / "reports"))
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("gpu_check: error: no CUDA device (torch.cuda.is_available() is "
                           "False")
    assert not (tmp_path / "results").exists() and not (tmp_path / "reports").exists()


def test_unknown_step_is_refused(gpu_check, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--steps", "facts,tabel1", "--dry-run"])
    assert exit_info.value.code == 2
    assert "unknown step(s) tabel1" in capsys.readouterr().err


def test_steps_selected_in_their_order(gpu_check, capsys: pytest.CaptureFixture) -> None:
    assert gpu_check.main(["--steps", "small,facts", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[1] for line in lines[:-1]] == ["facts", "small"]


def test_budgets_fit_eight_minutes(gpu_check) -> None:
    names = [step.name for step in gpu_check.STEPS]
    assert len(set(names)) == len(names)
    assert sum(step.budget_s for step in gpu_check.STEPS) <= 8 * 60


def fake_steps(gpu_check, seen: list[str]) -> list:
    """Steps standing in for the CUDA ones: one passes, one's check fails, one cannot run, one
    crashes with a two-line message, one passes after them all."""
    Step, Outcome = gpu_check.Step, gpu_check.Outcome

    def passes(name: str):
        def run(ctx) -> Outcome:
            seen.append(name)
            return Outcome(f"{name} fine", {"figure": 1.5})
        return run

    def fails(ctx) -> Outcome:
        seen.append("checked")
        gpu_check.require(False, "gpu_source unavailable: no visible GPU")

    def skips(ctx) -> Outcome:
        seen.append("skipped")
        raise gpu_check.Skip("vLLM does not import: ModuleNotFoundError")

    def crashes(ctx) -> Outcome:
        seen.append("crashed")
        raise RuntimeError("Expected all tensors to be on the same device\nsecond line")

    return [Step("first", "passes", 10, passes("first")), Step("checked", "fails", 10, fails),
            Step("skipped", "skips", 10, skips), Step("crashed", "crashes", 10, crashes),
            Step("last", "passes", 10, passes("last"))]


def ticking_clock():
    ticks = iter(range(100))
    return lambda: float(next(ticks))


def test_run_steps_reports_fail_and_skip_and_goes_on(gpu_check, tmp_path: Path) -> None:
    seen: list[str] = []
    cleanups: list[int] = []
    results = gpu_check.run_steps(fake_steps(gpu_check, seen), gpu_check.Context(root=tmp_path),
                                  after=lambda: cleanups.append(1), clock=ticking_clock())
    assert seen == ["first", "checked", "skipped", "crashed", "last"]
    assert len(cleanups) == 5  # GPU memory handed back after every step, failed ones too
    assert [(r.name, r.status) for r in results] == [
        ("first", "PASS"), ("checked", "FAIL"), ("skipped", "SKIP"), ("crashed", "FAIL"),
        ("last", "PASS")]
    lines = {r.name: r.line for r in results}
    assert lines["checked"] == "gpu_source unavailable: no visible GPU"
    assert lines["skipped"] == "vLLM does not import: ModuleNotFoundError"
    assert lines["crashed"] == "RuntimeError: Expected all tensors to be on the same device"
    assert results[0].data == {"figure": 1.5} and results[1].data == {}
    assert all(r.seconds == 1.0 for r in results)
    assert gpu_check.exit_code(results) == 1
    assert gpu_check.exit_code([r for r in results if r.status != "FAIL"]) == 0


def test_report_prints_table_then_json_last_and_writes_both_files(
        gpu_check, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    import _common

    monkeypatch.setattr(_common, "REPORT_DIR", tmp_path / "bench")
    results = gpu_check.run_steps(fake_steps(gpu_check, []), gpu_check.Context(root=tmp_path),
                                  clock=ticking_clock())
    capsys.readouterr()
    gpu_check.report(results, "NVIDIA H100 80GB HBM3")
    out = capsys.readouterr().out
    head = json.loads(out.strip().splitlines()[-1])
    assert head["gpu_check"] == "fail" and head["device"] == "NVIDIA H100 80GB HBM3"
    assert (head["passed"], head["failed"], head["skipped"]) == (
        ["first", "last"], ["checked", "crashed"], ["skipped"])
    assert head["wall_s"] == 5.0 and head["within_budget"] is True
    assert head["steps"]["crashed"] == {
        "status": "FAIL", "s": 1.0,
        "line": "RuntimeError: Expected all tensors to be on the same device"}
    table = out.split("\n{")[0]
    assert "GPU acceptance check (NVIDIA H100 80GB HBM3)" in table
    assert all(name in table for name in ("first", "checked", "skipped", "crashed", "last"))
    saved = json.loads((tmp_path / "bench" / "gpu_check.json").read_text())
    assert {k: saved[k] for k in head} == head
    assert saved["details"]["first"]["figure"] == 1.5 and "hardware" in saved
    md = (tmp_path / "bench" / "gpu_check.md").read_text()
    assert md.startswith("# GPU acceptance check: FAIL")
    assert "| skipped | SKIP" in md and "vLLM does not import" in md


def cuda_record(**changes) -> SimpleNamespace:
    """A record's fields as a CUDA run writes them (CUDA and NVML cannot exist here)."""
    from hydrabench.records.store import TaskMetrics

    throughput = {"tokens_per_s": 52000.0, "peak_memory_source": "cuda_max_memory_allocated"}
    energy = {"gpu_source": "measured:nvml", "gpu_kwh": 1e-4}
    training = {"first_loss": 3.2, "final_loss": 1.1}
    for section, values in changes.items():
        {"throughput": throughput, "energy": energy, "training": training}[section].update(values)
    metrics = {task: TaskMetrics(value=value, primary="acc,none", metrics={"acc,none": value},
                                 stderr={"acc,none": None}, n=100)
               for task, value in (("tiny_medical", 0.5), ("tiny_legal", 0.3))}
    return SimpleNamespace(
        run_id="lora-general-s0-x", metrics=metrics, column_tasks=tuple(metrics),
        metering=SimpleNamespace(train={"throughput": throughput, "energy": energy}),
        training=SimpleNamespace(train=training))


def test_cuda_training_figures_and_what_fails_them(gpu_check) -> None:
    figures = gpu_check.check_cuda_training(cuda_record())
    assert figures["score"] == 40.0 and figures["tokens_per_s"] == 52000.0
    assert figures["gpu_source"] == "measured:nvml"
    with pytest.raises(gpu_check.CheckFailed, match=r"^trained off CUDA \(memory peak_rss\), "
                                                    r"gpu_source none$"):
        gpu_check.check_cuda_training(cuda_record(throughput={"peak_memory_source": "peak_rss"},
                                                  energy={"gpu_source": "none"}))
    rose = cuda_record(training={"final_loss": 3.5})
    with pytest.raises(gpu_check.CheckFailed, match=r"^loss 3\.2 -> 3\.5$"):
        gpu_check.check_cuda_training(rose)
    assert gpu_check.check_cuda_training(rose, loss_must_fall=False)["final_loss"] == 3.5
    with pytest.raises(gpu_check.CheckFailed, match=r"^loss 3\.2 -> nan$"):
        gpu_check.check_cuda_training(cuda_record(training={"final_loss": float("nan")}),
                                      loss_must_fall=False)


def test_step_profiles_resolve_as_the_harness_reads_them(gpu_check, tmp_path: Path) -> None:
    """The tiny profile on CUDA and the small profile's column of synthetic tasks, as the steps
    write them, and a Qwen2-shaped model (shrunk here) given as --model gives one."""
    from hydrabench.config.profiles import load_profile
    from hydrabench.models import BUILTIN_TINY, resolve_model_dir
    from hydrabench.pipeline.resolve import resolve_spec

    ctx = gpu_check.Context(root=tmp_path)
    tiny = load_profile(str(gpu_check.tiny_cuda_profile(ctx)))
    assert (tiny.device, tiny.dtype, tiny.model) == ("cuda", "float32", BUILTIN_TINY)
    [hydra] = gpu_check.table1_runs(ctx, [gpu_check.HYDRA_ROW]).runs
    assert hydra.spec.device == "cuda" and hydra.spec.adapter.num_heads == 4
    assert (hydra.spec.train.max_steps, hydra.spec.eval.limit) == (gpu_check.MAX_STEPS,
                                                                   gpu_check.LIMIT)
    model_dir = gpu_check.qwen2_shaped_model(
        tmp_path / "qwen2", resolve_model_dir(BUILTIN_TINY),
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1}, "cpu")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    spec = resolve_spec("hydralora", "gpu_check", str(gpu_check.small_profile(ctx)),
                        model=str(model_dir))
    assert (spec.dtype, spec.device, spec.prompt_template) == ("bfloat16", "auto", "reference")
    assert spec.eval_tasks == tuple(gpu_check.SMALL_TASKS) and spec.corpus == "synthetic"
