"""Your own tasks and tables (--include-path, a profile's include_path): the README's worked
example run as it stands, and the run ids following the included task's YAML and data."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, child_env

from hydrabench.config import includes
from hydrabench.config.spec import spec_from_dict
from hydrabench.pipeline.resolve import resolve_spec
from hydrabench.records.provenance import task_fingerprints

# The README example runs the CLI (training included): `make test`, not the fast tier.
pytestmark = pytest.mark.slow


def readme_example() -> str:
    """The shell block of docs/custom-tasks.md ("Your own tasks and tables")."""
    section = (REPO / "docs" / "custom-tasks.md").read_text().split(
        "# Your own tasks and tables", 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.DOTALL).group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the README's example ran, as a user runs it (a shell, the hydrabench
    script), with its results and reports in it."""
    folder = tmp_path_factory.mktemp("example")
    env = child_env(folder / "results", HYDRABENCH_REPORTS=str(folder / "reports"),
                    PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    env.pop("HYDRABENCH_DATA_DIR", None)
    done = subprocess.run(["bash", "-e", "-c", readme_example()], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (folder / "stdout").write_text(done.stdout)
    return folder


def test_the_readme_example_scores_the_own_task_and_reports_the_own_table(example: Path) -> None:
    out = (example / "stdout").read_text()
    assert re.search(r"^capitals\s+acc,none\s+[\d.]+.*\(n=2\)$", out, re.MULTILINE), out
    assert re.search(r"^capitals\s+Capitals: LoRA and HydraLoRA", out, re.MULTILINE), out
    assert re.search(r"^table1\s", out, re.MULTILINE)  # beside the shipped ones
    report = (example / "reports" / "capitals.md").read_text()
    assert f"eval: included task folder {example / 'my_tasks'}" in report
    for row in ("Base", "LoRA (r=8)", "HydraLoRA (r=8, 2 B)"):
        assert re.search(rf"^\| {re.escape(row)} +\| \d+\.\d\d ± ", report, re.MULTILINE), report
    records = [json.loads(p.read_text())
               for p in (example / "results" / "runs").glob("*capitals*/record.json")]
    assert len(records) == 4  # eval's base model, and the table's three rows
    trained = next(r for r in records if r["spec"]["method"] == "lora")
    assert trained["spec"]["corpus"] == "my_tasks/capitals_train.jsonl"
    fingerprint = trained["spec"]["inputs"]["tasks"]["capitals"]
    assert fingerprint["include_path"] == str(example / "my_tasks")
    assert trained["profile"]["include_path"] == [str(example / "my_tasks")]


def test_editing_the_own_task_or_its_data_changes_the_run_id_not_the_training(
        example: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(example)
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(example / "results"))
    includes.use_only([], "--include-path")

    def spec():
        return resolve_spec("lora", "capitals", "my_profile.yaml")  # as the README names it

    before = spec()
    assert (example / "results" / "runs" / before.run_id / "record.json").is_file()
    task, data = (example / "my_tasks" / name for name in ("capitals.yaml", "capitals_test.jsonl"))
    original_task, original_data = task.read_text(), data.read_text()
    try:
        task.write_text(original_task.replace("Answer:", "A:"))
        edited_task = spec()
        task.write_text(original_task)
        data.write_text(original_data.replace("Paris", "Lyon"))
        edited_data = spec()
    finally:
        task.write_text(original_task)
        data.write_text(original_data)
    assert len({before.run_id, edited_task.run_id, edited_data.run_id}) == 3
    assert before.train_id == edited_task.train_id == edited_data.train_id
    assert spec().run_id == before.run_id
    # A Slurm job rebuilds the spec from a dict in a process that saw no --include-path: the
    # spec names the folder its task came from.
    includes.use_only([], "--include-path")
    includes.include_from_spec(spec_from_dict(before.to_dict()))
    assert includes.folder_of("capitals").root == example / "my_tasks"
    assert task_fingerprints(("capitals",)) == before.inputs.tasks
    includes.use_only([], "--include-path")  # the next test starts from none, as main does
