"""The run store: results/runs/<run_id>/record.json, written only when a run has finished.

A run's files are assembled in a staging directory and renamed into place in one step, so a
killed run leaves no partial record, and a finished run is found (and skipped) on rerun.
Replacing a finished run (`--force`) keeps a whole old or new run at every instant: see
`RunStore.staging`. A file lock per run id keeps two processes from running the same run at once.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from filelock import FileLock

from hydrabench.atomic import as_umask_allows
from hydrabench.config.profiles import remember_profile
from hydrabench.config.spec import RunSpec, spec_from_dict
from hydrabench.errors import SpecError
from hydrabench.paths import results_root

# In an artifact directory, written last: what trained it (its presence: the training finished).
ARTIFACT_INFO = "artifact.json"
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


class OutsideResults(SpecError):
    """A path read from results/ (a record's field, a symlink under it) that leads outside the
    results folder, or to another run's files: refused, never followed."""


def stored_artifact(artifact: Path) -> str:
    """How a record names its artifact: relative to the results root (artifacts/<train id>),
    so that a moved or copied results folder still finds its own."""
    return str(artifact) if artifact.parent.name != "artifacts" else f"artifacts/{artifact.name}"


class _Invalid(ValueError):
    """What makes a JSON value not a run record (CorruptRecord adds the file it came from)."""


def _take(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "",
          required: bool = False) -> Any:
    """d[key] when it is of `kind` (a bool is not a number); None when absent or null and not
    `required`."""
    value = d.get(key)
    if value is None and not required:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise _Invalid(f"{where}{key} is missing or not of type {names}")
    return value


def _one_line(value: Any, where: str) -> Any:
    """`value` when every string in it (nested in lists and dicts too) is one printable line:
    reports print these fields into Markdown, where a newline starts a heading or a table row."""
    texts = value.values() if isinstance(value, dict) else value if isinstance(
        value, list) else [value]
    for text in texts:
        if isinstance(text, (dict, list)):
            _one_line(text, where)
        elif isinstance(text, str) and not text.isprintable():
            raise _Invalid(f"{where} holds a line break or control character")
    return value


def _only(d: dict[str, Any], known: Iterable[str], where: str = "") -> None:
    """No key the record's schema does not name (a typo or another program's file)."""
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise _Invalid(f"{where}unknown field(s) {', '.join(map(repr, unknown))}")


def _names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


NUMBER = (int, float)
# lm-eval metrics that are a fraction of documents (a mean of 0/1 outcomes, or an F1): a value
# outside [0, 1] is not a score any evaluation gave. pass@k is named by its k.
FRACTIONS = ("acc", "acc_norm", "acc_mutual_info", "exact_match", "em", "f1", "mc1", "mc2")


def _metric_value(value: Any, key: str, where: str) -> float:
    """A metric's value as lm-eval gives it ("acc,none" → key): a finite number, in [0, 1] where
    the metric is a fraction."""
    if not isinstance(value, NUMBER) or isinstance(value, bool) or not math.isfinite(value):
        raise _Invalid(f"{where}{key} is {value!r}, not a finite number")
    name = key.split(",")[0]
    if (name in FRACTIONS or name.startswith("pass@")) and not 0 <= value <= 1:
        raise _Invalid(f"{where}{key} is {value!r}, outside [0, 1]")
    return value


def _count(d: dict[str, Any], key: str, where: str, required: bool = False) -> int | None:
    """d[key] when it is an integer >= 0 (a count, a seed); None when absent and not
    `required`."""
    value = _take(d, key, int, where, required)
    if value is not None and value < 0:
        raise _Invalid(f"{where}{key} is {value}, not >= 0")
    return value


@dataclass(frozen=True)
class TaskMetrics:
    """One lm-eval task's scores in a record (evaluate.TaskScore, as the runner writes it)."""

    value: float  # the primary metric's value
    primary: str  # its "metric,filter" key
    metrics: dict[str, float]  # every "metric,filter" key lm-eval reported
    stderr: dict[str, float | None]  # lm-eval's stderr of each (None where it gave none)
    n: int  # documents scored
    n_shot: int | None = None
    version: Any = None  # the task's version as lm-eval gives it (a number or a string)

    @classmethod
    def from_dict(cls, d: Any, task: str) -> TaskMetrics:
        where = f"metrics of {task}: "
        if not isinstance(d, dict):
            raise _Invalid(f"no metrics for its task {task!r}")
        _only(d, _names(cls), where)
        primary = _take(d, "primary", str, where, required=True)
        metrics = _take(d, "metrics", dict, where, required=True)
        stderr = _take(d, "stderr", dict, where, required=True)
        for key, value in metrics.items():
            _metric_value(value, key, where)
        for key, value in stderr.items():
            if value is not None and (not isinstance(value, NUMBER) or isinstance(value, bool)
                                      or not 0 <= value < math.inf):
                raise _Invalid(f"{where}the stderr of {key} is {value!r}, not a finite number "
                               ">= 0")
        return cls(value=_metric_value(_take(d, "value", NUMBER, where, required=True),
                                       primary, where),
                   primary=primary, metrics=metrics, stderr=stderr,
                   n=_count(d, "n", where, required=True), n_shot=_count(d, "n_shot", where),
                   version=d.get("version"))

    def key(self, metric: str | None) -> str | None:
        """The "metric,filter" key a column reads (None: not reported): the primary one, or
        the one `metric` names ("pass@10", or a whole key)."""
        if metric is None:
            return self.primary
        return next((k for k in self.metrics if metric in (k, k.split(",")[0])), None)


@dataclass(frozen=True)
class Training:
    """What trained the run's artifact, as the artifact says (its artifact.json)."""

    trained: bool | None = None  # False: nothing trains (base); None: not recorded (old records)
    train: dict[str, Any] | None = None  # the method's training summary: steps, losses, ...
    train_records: int | None = None  # corpus records it trained on
    parameters: dict[str, float] = field(default_factory=dict)  # Method.parameter_counts
    train_id: str | None = None
    inputs: dict[str, Any] | None = None  # fingerprints of the model and corpus it read

    @classmethod
    def from_artifact(cls, info: Any, where: str = "training: "
                      ) -> tuple[Training, dict[str, Any] | None]:
        """(training, its training phase's metering) from an artifact's info, where the two are
        kept together; a record keeps the metering under metering.train (records written before
        that kept it in both places)."""
        if not isinstance(info, dict):
            raise _Invalid(f"{where.rstrip(': ')} is missing or not of type dict")
        _only(info, [*_names(cls), "metering"], where)
        metering = _take(info, "metering", dict, where) or {}
        return cls(trained=_take(info, "trained", bool, where),
                   train=_take(info, "train", dict, where),
                   train_records=_take(info, "train_records", int, where),
                   parameters=_take(info, "parameters", dict, where) or {},
                   train_id=_take(info, "train_id", str, where),
                   inputs=_take(info, "inputs", dict, where)), _take(metering, "train", dict, where)

    @property
    def percent_param(self) -> float | None:
        """The paper's %Param: adapter parameters over the base model's."""
        return self.parameters.get("percent_param")


@dataclass(frozen=True)
class Metering:
    """Each phase's Meter result (metering.MeterResult.to_dict); None: the phase did not run
    for this run (nothing trained, or hf evaluation without an export)."""

    train: dict[str, Any] | None = None  # the artifact's training, in whichever run trained it
    eval: dict[str, Any] | None = None
    export: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Metering:
        _only(d, _names(cls), "metering: ")
        return cls(**{name: _take(d, name, dict, "metering: ") for name in _names(cls)})


@dataclass(frozen=True)
class Provenance:
    """What trained the artifact (as it recorded) and what scored it."""

    model_source: str  # the model as the spec names it (a directory or a hub id)
    model_fingerprint: str | None
    data_fingerprints: dict[str, str]  # corpus part → content digest
    data_source: str  # "local" or "hub": where lm-eval read the benchmarks
    packages: dict[str, str | None]
    git: dict[str, Any] | None  # commit and whether the tree was dirty
    python: str
    hardware: dict[str, Any]
    task_fingerprints: dict[str, Any] | None = None  # lm-eval task → config and data digests

    @classmethod
    def from_dict(cls, d: Any) -> Provenance:
        where = "provenance: "
        if not isinstance(d, dict):
            raise _Invalid("provenance is missing or not of type dict")
        _only(d, _names(cls), where)
        return cls(model_source=_take(d, "model_source", str, where, required=True),
                   model_fingerprint=_take(d, "model_fingerprint", str, where),
                   data_fingerprints=_take(d, "data_fingerprints", dict, where, required=True),
                   data_source=_one_line(_take(d, "data_source", str, where, required=True),
                                         f"{where}data_source"),
                   packages=_take(d, "packages", dict, where, required=True),
                   git=_take(d, "git", dict, where), python=_take(d, "python", str, where,
                                                                  required=True),
                   hardware=_one_line(_take(d, "hardware", dict, where, required=True),
                                      f"{where}hardware"),
                   task_fingerprints=_take(d, "task_fingerprints", dict, where))


@dataclass(frozen=True)
class RunRecord:
    """A finished run's record.json: the one place its fields are named (as lm-eval's results
    file has a declared shape). Reports, figures, compare, show, list and export read records
    only through it. Fields after `training` are absent from records written by hand (tests)
    or before they existed, and None there."""

    run_id: str
    method: str
    task: str  # the table column scored
    seed: int
    metrics: dict[str, TaskMetrics]  # lm-eval task → its scores
    column_tasks: tuple[str, ...]  # the lm-eval tasks whose mean is the column's score
    training: Training
    spec: dict[str, Any] | None = None  # the resolved RunSpec (RunStore.load_spec reads it)
    profile: dict[str, Any] | None = None  # the resolved profile, for where its file is not
    stand_in: bool | None = None  # scored on stand-in tasks (tables.scores_stand_ins)
    data_source: str | None = None  # where its training and evaluation data came from
    backend: str | None = None  # hf or vllm
    merge: str | None = None  # vllm: the merge served ("exact", or an approximate one)
    serving: dict[str, Any] | None = None  # vllm: engine (server, in-process), log, start-up
    merge_gap: dict[str, dict[str, dict[str, float]]] | None = None  # merge → task → scores
    artifact: Path | None = None  # the trained artifact it loaded
    train_id: str | None = None
    metering: Metering = field(default_factory=Metering)
    provenance: Provenance | None = None
    wall_s: dict[str, float] | None = None  # {"total": seconds}
    finished_at: str | None = None  # UTC, ISO 8601

    @classmethod
    def from_dict(cls, d: Any, path: Path | str = "record") -> RunRecord:
        """A record read back from JSON; CorruptRecord (one line naming `path`) when a field is
        missing, of the wrong type, or not one a record has."""
        try:
            return cls._parse(d)
        except _Invalid as err:
            raise CorruptRecord(f"corrupt record {path}: {err}") from None

    @classmethod
    def _parse(cls, d: Any) -> RunRecord:
        if not isinstance(d, dict):
            raise _Invalid(f"expected a JSON object, got {type(d).__name__}")
        _only(d, _names(cls))
        run_id, method, task = (_take(d, key, str, required=True)
                                for key in ("run_id", "method", "task"))
        seed = _count(d, "seed", "", required=True)
        metrics = {name: TaskMetrics.from_dict(entry, name)
                   for name, entry in _take(d, "metrics", dict, required=True).items()}
        column_tasks = tuple(_take(d, "column_tasks", list, required=True))
        for name in column_tasks:
            if not isinstance(name, str) or name not in metrics:
                raise _Invalid(f"no metrics for its task {name!r}")
        training, train_metering = Training.from_artifact(
            _take(d, "training", dict, required=True))
        metering = Metering.from_dict(_take(d, "metering", dict) or {})
        if metering.train is None:
            metering = replace(metering, train=train_metering)
        artifact = _take(d, "artifact", str)
        provenance = d.get("provenance")
        spec = _take(d, "spec", dict)
        if spec is not None:  # absent in records older than the fingerprints (base_record)
            _take(spec, "inputs", dict, "spec: ")
        return cls(
            run_id=run_id, method=method, task=task, seed=seed, metrics=metrics,
            column_tasks=column_tasks, training=training, spec=spec,
            profile=_take(d, "profile", dict), stand_in=_take(d, "stand_in", bool),
            data_source=_one_line(_take(d, "data_source", str), "data_source"),
            backend=_take(d, "backend", str),
            merge=_take(d, "merge", str), serving=_take(d, "serving", dict),
            merge_gap=_take(d, "merge_gap", dict),
            artifact=Path(artifact) if artifact else None, train_id=_take(d, "train_id", str),
            metering=metering,
            provenance=None if provenance is None else Provenance.from_dict(provenance),
            wall_s=_take(d, "wall_s", dict), finished_at=_take(d, "finished_at", str))

    def to_dict(self) -> dict[str, Any]:
        """The record as record.json holds it (every field; null where it does not apply)."""
        out = asdict(self)
        out["column_tasks"] = list(self.column_tasks)
        out["artifact"] = None if self.artifact is None else stored_artifact(self.artifact)
        return out

    @property
    def score(self) -> float | None:
        """The run's score on its column: the mean of its lm-eval tasks' headline values (None
        for a record that names no column task, as the smallest hand-written ones)."""
        if not self.column_tasks:
            return None
        return sum(self.metrics[t].value for t in self.column_tasks) / len(self.column_tasks)


def read_record(path: Path, run_id: str, runs: Path) -> RunRecord:
    if not path.exists():
        raise SpecError(f"no finished run {run_id!r} in {runs}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # truncated, empty or binary (UnicodeDecodeError)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CorruptRecord(f"corrupt record {path}: {reason}") from None
    loaded = RunRecord.from_dict(record, path)
    if loaded.run_id != run_id:  # copied from another run's folder: it would stand for that run
        raise CorruptRecord(f"corrupt record {path}: its run_id {loaded.run_id!r} is not its "
                            f"folder's name {run_id!r}")
    return loaded


# A replacement's directories beside the target: the finished new copy, and the old one set aside.
COMPLETE, ASIDE = ".complete-", ".old-"


class RunStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or results_root()
        self.runs = self.root / "runs"
        self.artifacts = self.root / "artifacts"
        self.exports = self.root / "exports"
        self._said: set[str] = set()  # corrupt records this store has reported on stderr
        self.made_locks: list[Path] = []
        self.recover()

    def run_dir(self, run_id: str) -> Path:
        """runs/<run id>/: the run's record, lm-eval's outputs, a server's log."""
        return self.runs / checked_run_id(run_id)

    def record_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "record.json"

    def artifact_dir(self, train_id: str) -> Path:
        """artifacts/<train id>/: what one training wrote, shared by the runs of its train id."""
        return self.artifacts / checked_run_id(train_id)

    def artifact_info(self, train_id: str) -> dict[str, Any] | None:
        """The finished artifact's ARTIFACT_INFO (what trained it); None while there is none."""
        path = self.artifact_dir(train_id) / ARTIFACT_INFO
        return json.loads(path.read_text()) if path.exists() else None

    def checkpoint_dir(self, train_id: str) -> Path:
        """Where a training of this train id checkpoints, so that a killed one resumes."""
        return self.artifacts / f".checkpoints-{checked_run_id(train_id)}"

    def export_dir(self, run_id: str, merge: str) -> Path:
        """exports/<run id>/ for the exact export, exports/<run id>-<merge>/ for an approximate
        merge."""
        return self.exports / (checked_run_id(run_id) if merge == "exact"
                               else f"{checked_run_id(run_id)}-{merge}")

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
        except OutsideResults:  # never "unfinished": a planted path stops the command
            raise
        except SpecError:  # no record
            return None
        return None

    def load(self, run_id: str) -> RunRecord:
        """The finished run's record, its artifact resolved inside the results root; one-line
        errors when there is none, it is corrupt, or a path in it or under its folder leads
        outside the root. The profile it carries stands in for its profile file where that is
        not found here, as data: its include_path is not (hydrabench runs no code a record
        names: docs/security.md)."""
        path = self.record_path(run_id)
        if path.exists() or path.is_symlink():
            self._no_links_out(self.run_dir(run_id), f"run {run_id}:")
        record = read_record(path, run_id, self.runs)
        record = replace(record, artifact=self.own_artifact(record, path))
        if record.profile is not None and record.spec is not None and isinstance(
                record.spec.get("profile"), str):
            remember_profile(record.spec["profile"], {
                key: value for key, value in record.profile.items() if key != "include_path"})
        return record

    def inside(self, path: Path, what: str) -> Path:
        """`path` when it resolves (symlinks followed) inside the results root; else one line
        naming it."""
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise OutsideResults(f"{what} {path} leads outside the results folder {self.root} "
                                 "(a symlink?): refused")
        return path

    def _no_links_out(self, directory: Path, what: str) -> None:
        """Nothing in `directory` (itself included) is a symlink or anything but a folder or a
        regular file: a shared results folder is read without following a link to another
        user's files (or to another run's weights under the same root), and without blocking
        on a fifo or a device."""
        self.inside(directory, what)
        if directory.is_symlink():
            raise OutsideResults(f"{what} {directory} is a symlink: refused (results folders "
                                 "hold their own files)")
        for parent, dirs, files in os.walk(directory):  # links to folders are listed, not entered
            for name in (*dirs, *files):
                entry = Path(parent) / name
                self.inside(entry, what)
                if entry.is_symlink():
                    raise OutsideResults(f"{what} {entry} is a symlink: refused (results "
                                         "folders hold their own files)")
                if not (entry.is_dir() or entry.is_file()):
                    raise OutsideResults(f"{what} {entry} is not a regular file (a fifo or a "
                                         "device?): refused")

    def own_artifact(self, record: RunRecord, path: Path) -> Path | None:
        """The run's own artifact folder under this root. A record names it artifacts/<its train
        id>; records written before that named it by absolute path, taken as the same folder
        under this root (so a moved or copied results folder finds its own, not the
        original's). Anything else (another run's artifact, '..', a folder elsewhere, a symlink
        out): one line, never followed."""
        named = record.artifact
        if named is None:
            return None
        train_id = record.train_id or named.name
        legacy = named.is_absolute() and named.parts[-2:] == ("artifacts", train_id)
        if (not legacy and named.parts != ("artifacts", train_id)) or not RUN_ID.fullmatch(
                train_id) or train_id.startswith("."):
            raise OutsideResults(f"record {path}: its artifact {str(named)!r} is not the run's "
                                 f"own (artifacts/{train_id} in the results folder): refused")
        artifact = self.inside(self.artifact_dir(train_id), f"record {path}: its artifact")
        if artifact.exists() or artifact.is_symlink():
            self._no_links_out(artifact, f"record {path}: its artifact")
        return artifact

    def load_spec(self, run_id: str) -> RunSpec:
        """The resolved spec a finished run recorded (a corrupt one: one line naming the file)."""
        spec = self.load(run_id).spec
        if spec is not None and "inputs" not in spec:
            raise SpecError(f"record {self.record_path(run_id)} predates the content fingerprints "
                            "in run ids: run it again (hydrabench run with its settings)")
        try:
            return spec_from_dict(spec)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # SpecError included
            raise CorruptRecord(f"corrupt record {self.record_path(run_id)}: its spec cannot "
                                f"be read ({type(err).__name__}: {err})") from None

    def records(self) -> Iterator[RunRecord]:
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
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise OutsideResults(f"lock {path} is not a plain file (a symlink?): refused; "
                                 "remove it if no hydrabench process is running")
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
            if final_dir.exists() or final_dir.is_symlink():  # --force: replace the previous
                os.replace(final_dir, aside)
                fault_point("aside")
            os.replace(complete, final_dir)
            fault_point("placed")
            _discard(aside)

    @contextmanager
    def _replacing(self, final_dir: Path) -> Iterator[None]:
        """Held while `final_dir` is swapped, so that `recover` never sees a swap midway."""
        with self.lock(f"replace-{final_dir.parent.name}-{final_dir.name}"):
            yield

    def recover(self) -> None:
        """After a kill during a replacement: put a whole copy back where one is missing (the
        finished new one, else the old one), then drop the leftovers."""
        for parent in (self.runs, self.artifacts, self.exports):
            leftovers = sorted(parent.glob(f"{COMPLETE}*")) + sorted(parent.glob(f"{ASIDE}*")) \
                if parent.is_dir() else []
            for name in dict.fromkeys(p.name.split("-", 1)[1].rpartition("-")[0]
                                      for p in leftovers):
                final_dir = parent / name
                with self._replacing(final_dir):
                    copies = [*parent.glob(f"{COMPLETE}{name}-*"), *parent.glob(f"{ASIDE}{name}-*")]
                    for copy in copies:
                        if final_dir.exists():
                            _discard(copy)
                        else:
                            os.replace(copy, final_dir)


def _discard(path: Path) -> None:
    """Delete a copy set aside; a link planted in its place is removed, never followed."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


# The settings `list runs` always shows (rank, training steps, eval limit); any other setting is
# shown where runs of one method and column differ in it, so that no two rows read the same.
ALWAYS_SHOWN = ("adapter.rank", "train.max_steps", "eval.limit")
SHORT = {"adapter.rank": "r", "adapter.num_heads": "N", "adapter.num_splits": "splits",
         "train.max_steps": "steps", "eval.limit": "limit"}
# Not settings a person chose per run (they follow from the others, or are long).
NOT_SHOWN = ("train.sharding", "adapter.target_modules", "adapter.blc_knowledge")


def run_settings(record: RunRecord) -> dict[str, Any]:
    """The record's adapter, train and eval settings, flat ("adapter.rank": 8); an untrained
    run (the base model) has no adapter or training settings that matter."""
    spec = record.spec or {}
    sections = ("eval",) if record.training.trained is False else ("adapter", "train", "eval")
    return {f"{section}.{key}": value for section in sections
            for key, value in (spec.get(section) or {}).items()
            if f"{section}.{key}" not in NOT_SHOWN}


def _setting_text(key: str, value: Any) -> str:
    if key == "train.max_steps" and value == 0:
        value = "epochs"  # 0: the whole epochs
    elif key == "eval.limit" and value is None:
        value = "all"
    return f"{SHORT.get(key, key.split('.', 1)[1])}={value}"


def distinguishing_settings(records: Sequence[RunRecord]) -> dict[str, str]:
    """run id → the settings that tell it apart: rank, steps and limit always, and every other
    setting in which runs of the same method and column differ."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for record in records:
        groups.setdefault((record.method, record.task), []).append(record)
    out = {}
    for group in groups.values():
        settings = [run_settings(r) for r in group]
        keys = sorted({k for s in settings for k in s})
        varying = [k for k in keys
                   if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]
        shown = [k for k in ALWAYS_SHOWN if any(k in s for s in settings)] + [
            k for k in varying if k not in ALWAYS_SHOWN]
        for record, values in zip(group, settings, strict=True):
            out[record.run_id] = " ".join(_setting_text(k, values.get(k)) for k in shown
                                          if k in values)
    return out


def matching_runs(records: Iterable[RunRecord], method: str | None = None,
                  task: str | None = None) -> list[RunRecord]:
    """`list runs --method M --task T`: the records of that method and column."""
    return [r for r in records if method in (None, r.method) and task in (None, r.task)]


def run_lines(records: Sequence[RunRecord]) -> list[str]:
    """`hydrabench list runs`: a header, then one line per finished run with the settings
    that tell it apart and its score (percent, the mean of its column's tasks)."""
    settings = distinguishing_settings(records)
    lines = [f"{'run id':44s} {'method':18s} {'task':9s} {'seed':4s} {'score':>6s}  "
             f"{'settings':40s} finished"]
    for record in records:
        score = "?" if record.score is None else f"{100 * record.score:.2f}"
        lines.append(f"{record.run_id:44s} {record.method:18s} {record.task:9s} "
                     f"s{record.seed:<3d} {score:>6s}  "
                     f"{settings[record.run_id]:40s} {record.finished_at or ''}")
    return lines


def run_line(record: RunRecord) -> str:
    """One finished run's line of `hydrabench list runs` (alone: rank, steps and limit)."""
    return run_lines([record])[1]


def base_record(store: RunStore, record: RunRecord) -> RunRecord | None:
    """The untrained base model's finished record on the same column, profile, model (same
    content) and evaluation settings as `record`, if there is one: its score is the baseline."""
    spec = json.loads(json.dumps(record.spec))  # as read back from JSON (tuples as lists)
    if not spec or "inputs" not in spec:  # predates the fingerprints: no base is shown the same
        return None
    same = ("task", "profile", "model", "eval_tasks", "eval")
    for other in store.records():
        theirs = other.spec
        # The untrained model's record, by what it says (no method is known here by name).
        if (other.training.trained is False and theirs is not None and "inputs" in theirs
                and set(record.metrics) <= set(other.metrics)  # a base value beside each task
                and all(theirs.get(k) == spec.get(k) for k in same)
                and all(theirs["inputs"].get(k) == spec["inputs"].get(k)
                        for k in ("model", "tasks"))):
            return other
    return None


def rounded(value: Any, digits: int = 4) -> str:
    """A figure as `show` prints it: 4 significant digits (a loss, a time), "?" when absent."""
    return "?" if not isinstance(value, (int, float)) or isinstance(value, bool) \
        else f"{value:.{digits}g}"


def hardware_text(hardware: dict[str, Any] | None) -> str | None:
    """The machine a record came from, in one phrase: CPU model, torch's threads (intra-op /
    inter-op), OMP_NUM_THREADS / MKL_NUM_THREADS, the BLAS, and its GPUs; None for records that
    predate those fields (no CPU model and no thread count recorded)."""
    if not hardware or (hardware.get("cpu_model") is None
                        and hardware.get("torch_threads") is None):
        return None
    gpus = hardware.get("gpus") or []
    names = sorted({str(g.get("name", "?")) if isinstance(g, dict) else str(g) for g in gpus})
    gpu = f"{len(gpus)}× {', '.join(names)}" if gpus else "no GPU"
    return (f"{hardware.get('cpu_model') or 'CPU not recorded'} "
            f"({hardware.get('logical_cores', '?')} logical cores); torch threads "
            f"{hardware.get('torch_threads', '?')} intra-op / "
            f"{hardware.get('torch_interop_threads', '?')} inter-op; OMP_NUM_THREADS "
            f"{hardware.get('omp_num_threads') or 'unset'}, MKL_NUM_THREADS "
            f"{hardware.get('mkl_num_threads') or 'unset'}; BLAS {hardware.get('blas') or '?'}; "
            f"{gpu}")


def describe_run(record: RunRecord, path: Path) -> list[str]:
    """What `hydrabench show RUN` prints: what ran, its hyper-parameters, its scores (value ±
    stderr, n), its training (figures rounded), the hardware, and where its files are."""
    spec = record.spec or {}
    lines = [f"run       {record.run_id}", f"record    {path}",
             f"what      {record.method} on {record.task}, seed {record.seed}, profile "
             f"{spec.get('profile', '?')}, model {spec.get('model', '?')}, "
             f"backend {record.backend or '?'}"]
    settings = run_settings(record)
    for section in ("adapter", "train", "eval"):
        values = [f"{k.split('.', 1)[1]}={v}" for k, v in settings.items()
                  if k.startswith(section + ".") and v is not None]
        if values:
            lines.append(f"{section:9s} {' '.join(values)}")
    for task, metrics in record.metrics.items():
        stderr = metrics.stderr.get(metrics.primary)
        spread = f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else ""
        lines.append(f"score     {task:24s} {metrics.primary:24s} "
                     f"{metrics.value:.4f}{spread}  (n={metrics.n})")
    train = record.training.train or {}
    lines.append(f"training  {train.get('steps')} steps, loss {rounded(train.get('first_loss'))} "
                 f"→ {rounded(train.get('final_loss'))}, "
                 f"{rounded(record.training.percent_param)} %Param"
                 if record.training.trained else "training  none (the base model)")
    wall = (record.wall_s or {}).get("total")
    machine = hardware_text(record.provenance.hardware if record.provenance else None)
    lines += [f"hardware  {machine or 'not recorded'}",
              f"artifact  {record.artifact or '?'}",
              f"finished  {record.finished_at or '?'}"
              + (f" in {rounded(wall, 3)} s" if wall is not None else "")]
    return lines
