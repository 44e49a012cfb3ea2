"""The run store: results/runs/<run_id>/record.json, written only when a run has finished.

A run's files are assembled in a staging directory and renamed into place in one step, so a
killed run leaves no partial record, and a finished run is found (and skipped) on rerun.
Replacing a finished run (`--force`) keeps a whole old or new run at every instant: see
`RunStore.staging`. A file lock per run id keeps two processes from running the same run at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
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


def fault_point(step: str) -> None:
    """Tests kill a replacement at each of its steps: HYDRABENCH_KILL_AT=<step> SIGKILLs this
    process there (a real signal, as a crash or an OOM kill would send)."""
    if os.environ.get("HYDRABENCH_KILL_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def checked_run_id(run_id: str) -> str:
    """A run id names one directory under results/: no separators, no '..', nothing hidden."""
    if not RUN_ID.fullmatch(run_id) or run_id.startswith("."):
        raise SpecError(f"invalid run id {run_id!r} (letters, digits, '.', '_' and '-' only)")
    return run_id


# A replacement's directories beside the target: the finished new copy, and the old one set aside.
COMPLETE, ASIDE = ".complete-", ".old-"


class RunStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or results_root()
        self.runs = self.root / "runs"
        self.artifacts = self.root / "artifacts"
        self.recover()

    def record_path(self, run_id: str) -> Path:
        return self.runs / checked_run_id(run_id) / "record.json"

    def has(self, run_id: str) -> bool:
        return self.record_path(run_id).exists()

    def load(self, run_id: str) -> dict[str, Any]:
        return json.loads(self.record_path(run_id).read_text())

    def records(self) -> Iterator[dict[str, Any]]:
        for path in sorted(self.runs.glob("[!.]*/record.json")):  # not a staging directory
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
        self._replace(scratch, final_dir)

    def _replace(self, scratch: Path, final_dir: Path) -> None:
        """Put the finished `scratch` in place of `final_dir`: the new copy is marked whole, the
        old one renamed aside, the new one renamed in, then the old one deleted. A kill at any
        step leaves a whole old or new copy, which `recover` puts back in place."""
        parent, name, tag = final_dir.parent, final_dir.name, scratch.name.rpartition("-")[2]
        complete, aside = parent / f"{COMPLETE}{name}-{tag}", parent / f"{ASIDE}{name}-{tag}"
        with self._replacing(final_dir):
            fault_point("staged")
            os.replace(scratch, complete)
            fault_point("complete")
            if final_dir.exists():  # --force: replace the previous result
                os.replace(final_dir, aside)
                fault_point("aside")
            os.replace(complete, final_dir)
            fault_point("placed")
            shutil.rmtree(aside, ignore_errors=True)

    @contextmanager
    def _replacing(self, final_dir: Path) -> Iterator[None]:
        """Held while `final_dir` is swapped, so that `recover` never sees a swap midway."""
        with self.lock(f"replace-{final_dir.parent.name}-{final_dir.name}"):
            yield

    def recover(self) -> None:
        """After a kill during a replacement: put a whole copy back where one is missing (the
        finished new one, else the old one), then drop the leftovers."""
        for parent in (self.runs, self.artifacts, self.root / "exports"):
            leftovers = sorted(parent.glob(f"{COMPLETE}*")) + sorted(parent.glob(f"{ASIDE}*")) \
                if parent.is_dir() else []
            for name in dict.fromkeys(p.name.split("-", 1)[1].rpartition("-")[0]
                                      for p in leftovers):
                final_dir = parent / name
                with self._replacing(final_dir):
                    copies = [*parent.glob(f"{COMPLETE}{name}-*"), *parent.glob(f"{ASIDE}{name}-*")]
                    for copy in copies:
                        if final_dir.exists():
                            shutil.rmtree(copy, ignore_errors=True)
                        else:
                            os.replace(copy, final_dir)
