"""The run store: results/runs/<run_id>/record.json, written only when a run has finished.

A run's files are assembled in a staging directory and renamed into place in one step, so a
killed run leaves no partial record, and a finished run is found (and skipped) on rerun.
A file lock per run id keeps two processes from running the same run at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from hydrabench.spec import SpecError

RUN_ID = re.compile(r"[A-Za-z0-9._-]+")


def results_root() -> Path:
    return Path(os.environ.get("HYDRABENCH_RESULTS", "results"))


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON via a temp file in the same directory and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


def checked_run_id(run_id: str) -> str:
    """A run id names one directory under results/: no separators, no '..', nothing hidden."""
    if not RUN_ID.fullmatch(run_id) or run_id.startswith("."):
        raise SpecError(f"invalid run id {run_id!r} (letters, digits, '.', '_' and '-' only)")
    return run_id


class RunStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or results_root()
        self.runs = self.root / "runs"
        self.artifacts = self.root / "artifacts"

    def record_path(self, run_id: str) -> Path:
        return self.runs / checked_run_id(run_id) / "record.json"

    def has(self, run_id: str) -> bool:
        return self.record_path(run_id).exists()

    def load(self, run_id: str) -> dict[str, Any]:
        return json.loads(self.record_path(run_id).read_text())

    def records(self) -> Iterator[dict[str, Any]]:
        for path in sorted(self.runs.glob("*/record.json")):
            yield json.loads(path.read_text())

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        lock_dir = self.root / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_dir / f"{key}.lock")):
            yield

    @contextmanager
    def staging(self, final_dir: Path) -> Iterator[Path]:
        """A scratch directory that becomes `final_dir` only if the block finishes.

        Callers hold the lock for `final_dir`, so scratch dirs left by a killed process for the
        same target are garbage and are removed first.
        """
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        for stale in final_dir.parent.glob(f".staging-{final_dir.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        scratch = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=f".staging-{final_dir.name}-"))
        try:
            yield scratch
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        if final_dir.exists():  # --force: replace the previous result
            shutil.rmtree(final_dir)
        os.replace(scratch, final_dir)
