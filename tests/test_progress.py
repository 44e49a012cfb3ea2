"""Long phases speak: the tiny base model's build says what it does, builds once when several
processes start together, cleans what a killed build left, and logs progress without a terminal."""

import subprocess
import sys
from pathlib import Path

import pytest

from hydrabench.progress import LogProgress

BUILD = ("from pathlib import Path; import sys; "
         "from hydrabench.models.tiny import TinyModelRecipe, build_tiny_model; "
         "print(build_tiny_model(TinyModelRecipe(pretrain_steps=20), Path(sys.argv[1])))")


@pytest.mark.slow
def test_processes_that_start_together_build_the_model_once(tmp_path: Path) -> None:
    stale = tmp_path / "models" / ".building-killed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    targets = {out.strip() for out, _ in outs}
    assert len(targets) == 1 and (Path(targets.pop()) / "hydrabench_tiny.json").exists()
    logs = "".join(err for _, err in outs)
    assert logs.count("building the tiny base model once: 20 pre-training steps") == 1
    # Not a terminal: a line per tenth of the steps, the last one at 100%.
    assert "pre-training the tiny base model: 20/20 (100%)" in logs
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        ".build.lock", next(p.name for p in (tmp_path / "models").glob("tiny-llama-*"))]


def test_log_progress_reports_each_tenth_and_the_postfix(capsys) -> None:
    steps = LogProgress(range(3, 20), "training", total=20, initial=3)
    for step in steps:
        steps.set_postfix(loss=f"{1 / (step + 1):.3f}")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[hydrabench] training: 4/20 (20%), loss 0.250"
    assert lines[-1] == "[hydrabench] training: 20/20 (100%), loss 0.050"
    assert len(lines) == 9  # 20%, 30%, ... 100%: once per tenth reached, not per step
