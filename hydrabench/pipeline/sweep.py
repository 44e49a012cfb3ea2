"""Sweeps: the run matrix of a table spec (rows × tasks × seeds), run here or on Slurm.

`local` runs one cell after another in this process and is resumable: finished runs are found by
run id. `slurm` submits one submitit job array with a job per run that is neither finished nor
queued; each job rebuilds its spec from a plain dict and calls the sweep's execute function
(`hydrabench.pipeline.run.execute`, which the caller passes; tests pass their own). Submitit's
folder (scripts, pickles, logs) is results/slurm/<sweep id>/, and results/runs/<run id>.slurm.json
points from a run to its job, so `--status` tells queued, running and failed runs apart from the
records, squeue and submitit's result files alone, without Slurm's accounting database. Pointers
and result files are read as data: a corrupt pointer is one line and a failed run; a result file
is read only as plain data (a pickle that names any class or function is refused).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError, JobPaths

from hydrabench.atomic import write_json_atomic
from hydrabench.config.profiles import load_profile
from hydrabench.config.spec import RunSpec, spec_from_dict, with_settings
from hydrabench.config.tables import Row, TableSpec
from hydrabench.errors import SpecError
from hydrabench.paths import slug
from hydrabench.pipeline.resolve import table_runs
from hydrabench.pipeline.run import shared_scorer, train_first
from hydrabench.progress import eta, log
from hydrabench.records.store import RunRecord, RunStore, checked_run_id
from hydrabench.serving.server import SharedServers

# The profile's `slurm:` section; a profile without one asks for this (and the cluster's default
# partition).
# `tasks` > 1: that many training processes per job (torch.distributed, one per GPU).
SLURM_DEFAULTS: dict[str, Any] = {"partition": None, "cpus": 1, "mem": "4G", "time_min": 60,
                                  "gpus": 0, "tasks": 1}
# What each slurm: setting must be; Slurm itself would refuse the job only at submission.
def _whole(low: int) -> tuple[str, Callable[[Any], bool]]:
    return (f"an integer >= {low}",
            lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v < 2**31)


SLURM_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "partition": ("a partition name or null", lambda v: v is None or (
        isinstance(v, str) and re.fullmatch(r"[\w.-]+", v) is not None)),
    "cpus": _whole(1), "time_min": _whole(1), "gpus": _whole(0), "tasks": _whole(1),
    "mem": ("a size such as 4G or 512M", lambda v: isinstance(v, str) and re.fullmatch(
        r"[1-9][0-9]{0,9}[KMGT]?", v) is not None),
}
# squeue states of a job that holds its node; any other state still in the queue is waiting.
ACTIVE_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT"}


@dataclass(frozen=True)
class PlannedRun:
    row_number: int  # 1-based, in the table's order: what --rows selects and --status shows
    row: Row
    spec: RunSpec
    skip: str | None = None  # why the cell stays empty; None: it runs


@dataclass(frozen=True)
class RunStatus:
    run: PlannedRun
    state: str  # done, running, pending, failed or skipped
    job: str | None = None  # the Slurm job id of its latest submission
    detail: str = ""


# Runs one spec and returns its record: hydrabench.pipeline.run.execute (store: where it writes).
Execute = Callable[..., RunRecord | None]


@dataclass
class Sweep:
    table: TableSpec
    profile: str
    runs: list[PlannedRun]
    execute: Execute
    # Where `execute` writes (results/ or $HYDRABENCH_RESULTS), hence where records are.
    store: RunStore = field(default_factory=RunStore)

    def log_plan(self) -> None:
        done = sum(self.store.has(r.spec.run_id) for r in self.runs)
        estimate = load_profile(self.profile).estimate
        log(f"plan: {self.table.name} on profile {self.profile}: {len(self.runs)} runs, {done} "
            f"already done, {len(self.runs) - done} to run; {estimate}; results in "
            f"{self.store.root.resolve()}")

    def _log_run(self, i: int, run: PlannedRun, progress: str = "") -> None:
        where = f"[{i}/{len(self.runs)}] {run.row.label} ({run.spec.task})"
        log(f"{where}: {run.skip}, left empty" if run.skip
            else f"{where} → {run.spec.run_id}" + (f"; {progress}" if progress else ""))

    def run_local(self, jobs: int = 1) -> None:
        """Every runnable cell in turn, in this process; finished runs are skipped. `jobs` > 1:
        that many processes at once, each on its share of the CPU's cores (`run_in_processes`).

        Where runs share vLLM servers (`eval.serving: adapters`), every run is trained first,
        then the runs are scored, those on one base model on one server (started once).
        """
        if jobs > 1:
            run_sweeps_in_processes([self], jobs)
            return
        self.log_plan()
        shared = [run.spec for run in self.runs if run.skip is None
                  and run.spec.eval.backend == "vllm" and run.spec.eval.serving == "adapters"]
        # The time left counts only the runs this call executes (finished ones return at once).
        todo = [r for r in self.runs if r.skip is None and not self.store.has(r.spec.run_id)]
        started, executed = time.monotonic(), 0
        for i, run in enumerate(self.runs, start=1):
            pending = run in todo
            self._log_run(i, run, eta(executed, len(todo), time.monotonic() - started)
                          if pending else "")
            if run.skip is None and shared:  # train every run before the servers start
                train_first(run.spec, self.store)
            elif run.skip is None:
                self.execute(run.spec)
            executed += pending
        if todo:
            log(f"{'trained' if shared else 'ran'} "
                f"{eta(len(todo), len(todo), time.monotonic() - started, 'runs')}")
        if not shared:
            return
        with SharedServers(shared, self.store.root / "servers") as servers:
            for run in self.runs:
                if run.skip is None:
                    self.execute(run.spec, scorer=shared_scorer(servers))

    def submit_slurm(self, executor_class: type[submitit.Executor] = submitit.SlurmExecutor,
                     ) -> None:
        """One job array for the runnable cells that are neither finished nor queued.

        `executor_class(folder=...)` submits it: Slurm's through submitit unless a caller
        passes another (a test with no Slurm installed)."""
        if executor_class is submitit.SlurmExecutor:
            check_slurm_installed()
        self.log_plan()
        todo = []
        for i, status in enumerate(self.status(), start=1):
            if status.state == "failed" or (status.state == "pending" and status.job is None):
                self._log_run(i, status.run)
                todo.append(status.run)
        if not todo:
            log("nothing to submit: every runnable cell is finished or queued")
            return
        sweep_id = f"{self.table.name}-{slug(self.profile)}-{time.strftime('%Y%m%d-%H%M%S')}"
        # Absolute paths: the jobs may start in another directory than this one.
        root = self.store.root.resolve()
        folder = root / "slurm" / sweep_id
        # The jobs run this Python (submitit's default): the project's environment.
        executor = executor_class(folder=folder)
        executor.update_parameters(job_name=f"hydrabench-{sweep_id}",
                                   **slurm_parameters(self.profile))
        made = [path for path in (root, root / "slurm", folder) if not path.exists()]
        try:
            # submitit echoes a refusing sbatch's stderr, then raises: the error line says it.
            with contextlib.redirect_stderr(io.StringIO()):
                # submitit pickles `execute` by reference (module and name): the job imports it.
                jobs = executor.map_array(run_job, [r.spec.to_dict() for r in todo],
                                          [str(root)] * len(todo), [self.execute] * len(todo))
        except FailedJobError as err:  # sbatch exited non-zero: nothing was submitted
            for path in reversed(made):  # the folder: scripts and pickles of no job
                if path == folder:
                    shutil.rmtree(folder, ignore_errors=True)
                with contextlib.suppress(OSError):  # not empty: another process wrote there
                    path.rmdir()
            runs = f"{len(todo)} run{'s' if len(todo) > 1 else ''}"
            raise SpecError(f"sbatch refused the sweep's job array of {runs}, nothing was "
                            f"submitted: {sbatch_message(err)} (the profile's slurm settings: "
                            f"hydrabench profile show {self.profile})") from None
        except FailedSubmissionError as err:  # sbatch succeeded, but said no job id
            output = re.search(r'output "(.*)"', str(err), re.S)
            said = " ".join(output[1].split()) if output else str(err)
            raise SpecError(f"sbatch exited 0 but its output named no job id ({said!r}): the "
                            f"jobs may be queued under ids hydrabench cannot follow; check "
                            f"squeue before sweeping again (their scripts: {folder})") from None
        for run, job in zip(todo, jobs, strict=True):
            write_json_atomic(pointer_path(self.store, run.spec.run_id), {
                "job_id": job.job_id, "sweep_id": sweep_id, "folder": str(folder),
                "log": str(job.paths.stderr),
                "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        log(f"submitted {len(jobs)} jobs as array {jobs[0].job_id.split('_')[0]}; "
            f"logs in {folder}")

    def status(self) -> list[RunStatus]:
        pointers, corrupt = {}, {}
        for run in self.runs:
            try:
                if (pointer := read_pointer(self.store, run.spec.run_id)) is not None:
                    pointers[run.spec.run_id] = pointer
            except CorruptPointer as err:  # resubmitted like a failed run, which replaces it
                print(f"[hydrabench] {err}: taken as failed", file=sys.stderr, flush=True)
                corrupt[run.spec.run_id] = str(err)
        # Ask Slurm before reading the records: a job that ends in between then reads as done;
        # the other way round it would read as gone without a record, i.e. failed.
        unfinished = [rid for rid in pointers if not self.store.has(rid)]
        queue = queued_jobs() if unfinished else {}
        return [RunStatus(r, "failed", None, corrupt[r.spec.run_id])
                if r.spec.run_id in corrupt and not r.skip and not self.store.has(r.spec.run_id)
                else self._status(r, pointers.get(r.spec.run_id), queue) for r in self.runs]

    def _status(self, run: PlannedRun, pointer: dict[str, Any] | None,
                queue: dict[str, str]) -> RunStatus:
        job = pointer["job_id"] if pointer else None
        if run.skip:
            return RunStatus(run, "skipped", None, run.skip)
        if self.store.has(run.spec.run_id):
            return RunStatus(run, "done", job)
        if problem := self.store.problem(run.spec.run_id):  # runs again when resubmitted
            return RunStatus(run, "failed", job, problem)
        if pointer is None:
            return RunStatus(run, "pending", None, "not submitted")
        if job in queue:
            state = queue[job]
            return RunStatus(run, "running" if state.split()[0] in ACTIVE_STATES else "pending",
                             job, state)
        return RunStatus(run, "failed", job, failure_reason(pointer))

    def wait(self, poll_s: float = 5.0) -> list[RunStatus]:
        """Block until no run of the sweep is queued or running on Slurm; the final statuses."""
        while True:
            statuses = self.status()
            if not any(s.state == "running" or (s.state == "pending" and s.job)
                       for s in statuses):
                return statuses
            time.sleep(poll_s)


def plan_sweep(table: TableSpec, profile: str, seeds: tuple[int, ...], execute: Execute, *,
               overrides: dict[str, dict[str, Any]] | None = None,
               rows: list[int] | None = None, allow_code_execution: bool = False) -> Sweep:
    """The table's runs, each with `overrides` ({"train": {...}, "eval": {...}}) applied, to be
    run by `execute` (hydrabench.pipeline.run.execute).

    `rows` keeps only those rows (1-based, in the table's order). Overrides change run ids:
    --status finds a sweep's runs only when given the same ones. A row's unknown method is an
    error here (resolving its specs checks the name).
    """
    slurm_parameters(profile)  # a bad slurm: section is one line whatever the executor
    bad = [n for n in rows or () if not 1 <= n <= len(table.rows)]
    if bad:
        raise SpecError(f"--rows {bad}: table {table.name} has rows 1-{len(table.rows)}")
    numbers = {id(row): n for n, row in enumerate(table.rows, start=1) if not rows or n in rows}
    table = replace(table, rows=tuple(row for row in table.rows if id(row) in numbers))
    unapproved = "runs model-written code (opt in with --allow-code-execution)"
    runs = [PlannedRun(numbers[id(row)], row, with_overrides(spec, overrides or {}),
                       unapproved if spec.eval.allow_code_execution and not allow_code_execution
                       else None)
            for row, _, spec in table_runs(table, profile, seeds)]
    return Sweep(table, profile, runs, execute)


def with_overrides(spec: RunSpec, overrides: dict[str, dict[str, Any]]) -> RunSpec:
    """`spec` with settings of its train/adapter/eval sections replaced (and validated, as a
    profile's are)."""
    return replace(spec, **{section: with_settings(getattr(spec, section), values, section)
                            for section, values in overrides.items() if values})


def sbatch_message(err: FailedJobError) -> str:
    """The message of a refusing sbatch (submitit's error holds its stderr) on one line: its
    last three lines, less sbatch's `sbatch: error:` prefixes."""
    lines = [re.sub(r"^sbatch: (error|fatal): ", "", line.strip())
             for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines[-3:]) or "sbatch exited with an error and said nothing"


def check_slurm_installed() -> None:
    """Submitting needs Slurm's sbatch here; without it submitit fails with a traceback."""
    if shutil.which("sbatch") is None:
        raise SpecError("--executor slurm, but Slurm's sbatch is not installed here: submit from "
                        "a Slurm login node, or use --executor local")


def slurm_parameters(profile: str) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters from the profile's `slurm:` section."""
    section = load_profile(profile).slurm
    unknown = set(section) - set(SLURM_DEFAULTS)
    if unknown:
        raise SpecError(f"profile {profile}: unknown slurm setting(s) {sorted(unknown)}; "
                        f"valid: {sorted(SLURM_DEFAULTS)}")
    settings = {**SLURM_DEFAULTS, **section}
    for key, (wanted, ok) in SLURM_CHECKS.items():
        if not ok(settings[key]):
            raise SpecError(f"profile {profile}: slurm {key} must be {wanted}, "
                            f"got {settings[key]!r}")
    params: dict[str, Any] = {"cpus_per_task": settings["cpus"], "mem": settings["mem"],
                              "time": settings["time_min"], "ntasks_per_node": settings["tasks"]}
    # Only ask for what is wanted: --gpus-per-node=0 is an error on clusters without GPU gres.
    if settings["gpus"]:
        params["gpus_per_node"] = settings["gpus"]
    if settings["partition"]:
        params["partition"] = settings["partition"]
    return params


def run_job(spec: dict[str, Any], results_root: str, execute: Execute) -> str:
    """The body of one Slurm task: `execute` the spec (skipped if it finished meanwhile); its
    run id.

    A job of several tasks is one torch.distributed training, as under torchrun: submitit sets
    the same variables from Slurm's (every GPU stays visible: the processes pick theirs by
    LOCAL_RANK, and rank 0's vLLM may use them all).
    """
    import torch

    # Without cgroups a job sees every core of the node: use those Slurm allotted to it.
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
    if int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    run = spec_from_dict(spec)
    execute(run, store=RunStore(Path(results_root)))
    return run.run_id


def check_parallel(jobs: int, device: str, backend: str, what: str) -> None:
    """`jobs` runs at once share a CPU's cores: refused before any work where a run (`what`)
    would take a GPU or a vLLM engine, each of which wants the whole device."""
    if jobs < 1:
        raise SpecError(f"--jobs must be 1 or more, got {jobs}")
    if jobs > 1 and device != "cpu":
        raise SpecError(f"--jobs {jobs}: {what} runs on device {device!r}; several runs at "
                        "once share a CPU's cores (device cpu): on a GPU use --jobs 1 or "
                        "--executor slurm")
    if jobs > 1 and backend == "vllm":
        raise SpecError(f"--jobs {jobs}: {what} is scored by vLLM, whose engine takes every "
                        "core: use --jobs 1")


def check_sweeps_parallel(sweeps: list[Sweep], jobs: int) -> None:
    for sweep in sweeps:
        for run in sweep.runs:
            if run.skip is None:
                check_parallel(jobs, run.spec.device, run.spec.eval.backend, run.spec.run_id)


def _job_process(threads: int, folders: list[str]) -> None:
    """A job process's set-up: its share of the cores, and the parent's included task folders."""
    import torch

    from hydrabench.config.includes import use_only

    torch.set_num_threads(threads)
    use_only(folders, "--include-path")


def _job(spec: dict[str, Any], results_root: str, execute: Execute) -> str:
    run = spec_from_dict(spec)
    execute(run, store=RunStore(Path(results_root)))
    return run.run_id


def run_sweeps_in_processes(sweeps: list[Sweep], jobs: int) -> None:
    """The runnable cells of `sweeps` (one store and execute), neither finished nor repeated
    (sweeps may share runs), `jobs` at a time: one set of processes for them all."""
    check_sweeps_parallel(sweeps, jobs)
    if not sweeps:
        return
    todo: dict[str, PlannedRun] = {}
    for sweep in sweeps:
        sweep.log_plan()
        for run in sweep.runs:
            if run.skip is None and not sweep.store.has(run.spec.run_id):
                todo.setdefault(run.spec.run_id, run)
    run_in_processes([r.spec for r in todo.values()], sweeps[0].store, sweeps[0].execute, jobs,
                     [f"{r.row.label} ({r.spec.task})" for r in todo.values()])


def run_in_processes(specs: list[RunSpec], store: RunStore, execute: Execute, jobs: int,
                     labels: list[str]) -> None:
    """`specs` (shown as `labels`) run `jobs` at a time, each process with cores/jobs torch
    threads (spawned: no forked torch state). On a failure no new run starts, those running
    finish (their training is kept), then the first error is raised; a finished run is never
    lost."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from hydrabench.config.includes import included

    if not specs:
        return
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    log(f"{len(specs)} runs, {jobs} at a time, {threads} thread(s) each")
    started = time.monotonic()
    folders = [str(f.root) for f in included()]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_job_process, initargs=(threads, folders)) as pool:
        futures = {pool.submit(_job, spec.to_dict(), str(store.root.resolve()), execute):
                   (label, spec.run_id) for spec, label in zip(specs, labels, strict=True)}
        pending, failed = set(futures), None
        while pending and failed is None:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                label, run_id = futures[future]
                if future.exception() is not None:
                    failed = failed or future
                else:
                    progress = eta(len(futures) - len(pending), len(futures),
                                   time.monotonic() - started)
                    log(f"{label} → {run_id}: done; {progress}")
        if failed is not None:
            for future in pending:
                future.cancel()  # not started: nothing lost; those running finish
            wait(pending)
            err = failed.exception()
            if isinstance(err, BrokenProcessPool):
                raise SpecError("a run's process died (killed, or out of memory?): finished "
                                "runs are kept; run the same command again to go on") from err
            raise err


def pointer_path(store: RunStore, run_id: str) -> Path:
    """results/runs/<run id>.slurm.json: the run's latest Slurm job, beside its record dir."""
    return store.runs / f"{checked_run_id(run_id)}.slurm.json"


class CorruptPointer(SpecError):
    """A results/runs/<run id>.slurm.json that is not a pointer this sweep wrote."""


# What a pointer holds (more keys are allowed): strings of one line; a job id as Slurm gives it.
POINTER_KEYS = ("job_id", "folder", "log")
JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?")


def read_pointer(store: RunStore, run_id: str) -> dict[str, Any] | None:
    """The run's Slurm pointer (None: never submitted); CorruptPointer, one line naming the
    file, when it is not JSON or not a pointer's shape."""
    path = pointer_path(store, run_id)
    if not (path.exists() or path.is_symlink()):
        return None
    if path.is_symlink() or not path.is_file():  # a fifo would block the reader
        raise CorruptPointer(f"corrupt Slurm pointer {path}: not a regular file")
    try:
        pointer = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # cut short, binary, not JSON (JSONDecodeError)
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise CorruptPointer(f"corrupt Slurm pointer {path}: {reason}") from None
    if not isinstance(pointer, dict) or not all(
            isinstance(pointer.get(key), str) and "\n" not in pointer[key]
            and "\r" not in pointer[key] for key in POINTER_KEYS) or not JOB_ID.fullmatch(
            pointer["job_id"]):
        raise CorruptPointer(f"corrupt Slurm pointer {path}: expected an object whose "
                             f"{', '.join(POINTER_KEYS)} are one-line strings, a Slurm job id")
    if not pointer["log"].isprintable():  # printed by --status: no terminal escapes
        raise CorruptPointer(f"corrupt Slurm pointer {path}: its log path is not printable")
    folder, jobs = Path(pointer["folder"]).resolve(), (store.root / "slurm").resolve()
    # Its job folder is one this store's sweeps write (under results/slurm), no other: a link
    # out resolves outside.
    if folder == jobs or not folder.is_relative_to(jobs):
        raise CorruptPointer(f"corrupt Slurm pointer {path}: its job folder "
                             f"{pointer['folder']} is not under {store.root / 'slurm'}")
    return pointer


def queued_jobs() -> dict[str, str]:
    """Job id (array elements as <array>_<index>) → "STATE (reason)" of this user's queue."""
    try:
        out = subprocess.run(["squeue", "--noheader", "--array", "--me", "--format=%i|%T|%r"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or err
        raise SpecError(f"squeue failed, so submitted runs cannot be told apart: "
                        f"{detail}") from None
    jobs = {}
    for line in out.splitlines():
        job, state, reason = line.split("|", 2)
        jobs[job] = state if reason in ("", "None") else f"{state} ({reason})"
    return jobs


class _PlainData(pickle.Unpickler):
    """Unpickles strings, numbers, tuples, lists and dicts only: every class or function a
    pickle names is refused, so a pickle planted under results/ runs no code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def failure_reason(pointer: dict[str, Any]) -> str:
    """Why a job left the queue without a record: its Python error as submitit's result file
    gives it (read as plain data only: a planted pointer or pickle runs nothing), else where to
    look."""
    unknown = f"ended without a record (killed? time limit?); see {pointer['log']}"
    result = JobPaths(pointer["folder"], job_id=pointer["job_id"], task_id=0).result_pickle
    if result.is_symlink() or not result.is_file():
        return unknown
    try:
        with result.open("rb") as fh:
            outcome, value = _PlainData(fh).load()
    except Exception:  # any damage, or a pickle that names code: not a result
        return f"{unknown} (its result file {result} is not submitit's: not read)"
    if outcome == "error":
        lines = [line for line in str(value).splitlines() if line.strip()]
        return lines[-1] if lines else "error"
    return unknown


def format_status(statuses: list[RunStatus]) -> str:
    """A small table, one line per run, and the count of each state."""
    from tabulate import tabulate

    rows = [(s.run.row_number, s.run.row.label, s.run.spec.task, s.run.spec.seed, s.state,
             s.job or "", s.run.spec.run_id, s.detail) for s in statuses]
    counts = {state: sum(s.state == state for s in statuses)
              for state in ("done", "running", "pending", "failed", "skipped")}
    table = tabulate(rows, headers=["#", "row", "task", "seed", "state", "job", "run id",
                                    "detail"])
    return table + "\n" + ", ".join(f"{n} {state}" for state, n in counts.items() if n)
