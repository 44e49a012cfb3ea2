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
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from hydrabench.atomic import as_umask_allows
from hydrabench.errors import SpecError
from hydrabench.paths import results_root
from hydrabench.profiles import remember_profile
from hydrabench.spec import RunSpec, spec_from_dict

RUN_ID = re.compile(r"[A-Za-z0-9._-]+")


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


class CorruptRecord(SpecError):
    """A record.json that is not a whole record (truncated, empty, binary, wrong types)."""


def _record_problem(record: Any) -> str | None:
    """What makes `record` not a run record of the shape reports and commands read."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for key, kind in (("run_id", str), ("method", str), ("task", str), ("seed", int),
                      ("metrics", dict), ("column_tasks", list), ("training", dict)):
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{key} is missing or not of type {kind.__name__}"
    for task in record["column_tasks"]:
        entry = record["metrics"].get(task) if isinstance(task, str) else None
        if not isinstance(entry, dict):
            return f"no metrics for its task {task!r}"
        value, n = entry.get("value"), entry.get("n")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not isinstance(
                n, int) or not isinstance(entry.get("stderr"), dict) or not isinstance(
                entry.get("metrics"), dict):
            return f"metrics of {task} lack a numeric value, n, stderr or metrics"
    return None


def read_record(path: Path, run_id: str, runs: Path) -> dict[str, Any]:
    if not path.exists():
        raise SpecError(f"no finished run {run_id!r} in {runs}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # truncated, empty or binary (UnicodeDecodeError)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CorruptRecord(f"corrupt record {path}: {reason}") from None
    problem = _record_problem(record)
    if problem:
        raise CorruptRecord(f"corrupt record {path}: {problem}")
    return record


# A replacement's directories beside the target: the finished new copy, and the old one set aside.
COMPLETE, ASIDE = ".complete-", ".old-"


class RunStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or results_root()
        self.runs = self.root / "runs"
        self.artifacts = self.root / "artifacts"
        self._said: set[str] = set()  # corrupt records this store has reported on stderr
        self.made_locks: list[Path] = []
        self.recover()

    def record_path(self, run_id: str) -> Path:
        return self.runs / checked_run_id(run_id) / "record.json"

    def has(self, run_id: str) -> bool:
        """A finished run's record exists and is whole (a corrupt one is said once on stderr and
        counts as unfinished: `run` runs it again, reports leave its cell empty)."""
        problem = self.problem(run_id)
        if problem and problem not in self._said:
            self._said.add(problem)
            print(f"[hydrabench] {problem}: taken as unfinished", file=sys.stderr, flush=True)
        return self.record_path(run_id).exists() and problem is None

    def problem(self, run_id: str) -> str | None:
        """Why the run's record.json is not a readable record, naming the file; None when it is
        one or there is none."""
        try:
            self.load(run_id)
        except CorruptRecord as err:
            return str(err)
        except SpecError:  # no record
            return None
        return None

    def load(self, run_id: str) -> dict[str, Any]:
        """The finished run's record; one-line errors when there is none or it is corrupt. The
        profile it carries stands in for its profile file where that is not found here."""
        record = read_record(self.record_path(run_id), run_id, self.runs)
        spec = record.get("spec")
        if isinstance(record.get("profile"), dict) and isinstance(spec, dict) and isinstance(
                spec.get("profile"), str):
            remember_profile(spec["profile"], record["profile"])
        return record

    def load_spec(self, run_id: str) -> RunSpec:
        """The resolved spec a finished run recorded (a corrupt one: one line naming the file)."""
        record = self.load(run_id)
        if isinstance(record.get("spec"), dict) and "inputs" not in record["spec"]:
            raise SpecError(f"record {self.record_path(run_id)} predates the content fingerprints "
                            "in run ids: run it again (hydrabench run with its settings)")
        try:
            return spec_from_dict(record["spec"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # SpecError included
            raise CorruptRecord(f"corrupt record {self.record_path(run_id)}: its spec cannot "
                                f"be read ({type(err).__name__}: {err})") from None

    def records(self) -> Iterator[dict[str, Any]]:
        """Every finished run's record (corrupt ones said on stderr and left out)."""
        for directory in sorted(self.runs.glob("[!.]*")):  # not a staging directory
            if directory.is_dir() and self.has(directory.name):
                yield self.load(directory.name)

    def corrupt_records(self) -> list[str]:
        """One line per corrupt record.json under runs/ (for reports to say what they skipped)."""
        return [p for d in sorted(self.runs.glob("[!.]*")) if (p := self.problem(d.name))]

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Held by one process at a time. The lock file stays when it is released; those this
        store made are listed in `made_locks` (a failed run removes its own)."""
        path = self.root / ".locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            self.made_locks.append(path)
        with FileLock(str(path)):
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
        as_umask_allows(scratch)
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


def column_score(record: dict[str, Any]) -> float:
    """The run's score on its column: the mean of its lm-eval tasks' headline values."""
    values = [record["metrics"][task]["value"] for task in record["column_tasks"]]
    return sum(values) / len(values)


def metric_key(task_metrics: dict[str, Any], metric: str | None) -> str | None:
    """The "metric,filter" key a column reads from one task's metrics (None: not reported)."""
    if metric is None:
        return task_metrics["primary"]
    keys = task_metrics["metrics"]
    return next((k for k in keys if metric in (k, k.split(",")[0])), None)


def run_line(record: dict[str, Any]) -> str:
    """One line per finished run, for `hydrabench list runs`."""
    return (f"{record['run_id']:44s} {record['method']:18s} {record['task']:9s} "
            f"s{record['seed']:<3d} {column_score(record):.4f}  {record.get('finished_at', '')}")


def base_record(store: RunStore, record: dict[str, Any]) -> dict[str, Any] | None:
    """The untrained base model's finished record on the same column, profile, model (same
    content) and evaluation settings as `record`, if there is one: its score is the baseline."""
    spec = json.loads(json.dumps(record["spec"]))  # as read back from JSON (tuples as lists)
    same = ("task", "profile", "model", "eval_tasks", "eval")
    for other in store.records():
        theirs = other["spec"]
        if (other["method"] == "base" and all(theirs.get(k) == spec.get(k) for k in same)
                and theirs["inputs"]["model"] == spec["inputs"]["model"]
                and theirs["inputs"]["tasks"] == spec["inputs"]["tasks"]):
            return other
    return None


def describe_run(record: dict[str, Any], path: Path) -> list[str]:
    """What `hydrabench show RUN` prints: what ran, its scores (value ± stderr, n), its training
    and where its files are."""
    spec = record.get("spec", {})
    lines = [f"run       {record['run_id']}", f"record    {path}",
             f"what      {record['method']} on {record['task']}, seed {record['seed']}, profile "
             f"{spec.get('profile', '?')}, model {spec.get('model', '?')}, "
             f"backend {record.get('backend', '?')}"]
    for task, metrics in record["metrics"].items():
        stderr = metrics["stderr"].get(metrics.get("primary"))
        spread = f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else ""
        lines.append(f"score     {task:24s} {metrics.get('primary', ''):24s} "
                     f"{metrics['value']:.4f}{spread}  (n={metrics['n']})")
    train = record["training"].get("train") or {}
    lines.append(f"training  {train.get('steps')} steps, loss {train.get('first_loss')} → "
                 f"{train.get('final_loss')}" if record["training"].get("trained")
                 else "training  none (the base model)")
    lines += [f"artifact  {record.get('artifact', '?')}",
              f"finished  {record.get('finished_at', '?')}"]
    return lines
