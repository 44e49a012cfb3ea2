"""Your own lm-eval tasks and table specs beside the shipped ones: lm-eval's `--include_path`.

An included folder is laid out like tasks/: lm-eval task YAML anywhere in it, table specs (the
format of tasks/tables/*.yaml) in its tables/. `--include-path DIR` and a profile's
`include_path:` add folders for this process; unlike HYDRABENCH_TASKS_DIR they replace nothing,
so a task or table named like a shipped one is refused. A run's spec names the folder each of its
included tasks came from (its task fingerprint), so a Slurm job finds them again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hydrabench.config.profiles import load_profile, load_yaml
from hydrabench.config.spec import RunSpec
from hydrabench.errors import SpecError, require
from hydrabench.paths import TASKS_DIR


class TaskYamlLoader(yaml.SafeLoader):
    """lm-eval's task YAML, read without running anything: `!function module.name` is its text."""


TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


@dataclass(frozen=True)
class IncludedFolder:
    root: Path  # absolute
    tasks: dict[str, Path]  # task or group name → the YAML file defining it
    tables: dict[str, Path]  # table spec name → its file (root/tables/NAME.yaml)

    def family(self, task: str) -> Path:
        """The top-level folder of the root holding the task's YAML (the root for a file in it),
        as provenance fingerprints the shipped task families."""
        top = self.tasks[task].relative_to(self.root).parts[0]
        return self.root / top if (self.root / top).is_dir() else self.root


_FOLDERS: dict[Path, IncludedFolder] = {}


def use_only(folders: Iterable[str | Path], origin: str) -> None:
    """This process's included folders are `folders` (the command line's and the profile's)."""
    _FOLDERS.clear()
    include(folders, origin)


def include(folders: Iterable[str | Path], origin: str) -> None:
    """Add task folders (each once), checked before any work: the folder exists, its YAML
    parses, and no task or table in it has a name a shipped one or another folder has.
    `origin` says in an error where the folder was named (--include-path, a profile)."""
    for folder in folders:
        root = Path(folder).resolve()
        if root in _FOLDERS:
            continue
        require(root.is_dir(), f"{origin} {folder}: no such folder")
        found = _read_folder(root)
        taken = {**_shipped_tasks(), **{name: path for other in _FOLDERS.values()
                                        for name, path in other.tasks.items()}}
        tables = {**_shipped_tables(), **{name: path for other in _FOLDERS.values()
                                          for name, path in other.tables.items()}}
        for kind, mine, theirs in (("task", found.tasks, taken), ("table", found.tables, tables)):
            for name, path in mine.items():
                require(name not in theirs, f"{path}: {kind} {name} is already defined by "
                                            f"{theirs.get(name)}: give yours another name")
        _FOLDERS[root] = found


def included() -> tuple[IncludedFolder, ...]:
    return tuple(_FOLDERS.values())


def folder_of(task: str) -> IncludedFolder | None:
    return next((folder for folder in _FOLDERS.values() if task in folder.tasks), None)


def table_files() -> dict[str, Path]:
    """Table name → spec file: the shipped ones and the included folders'."""
    return {**_shipped_tables(), **{name: path for folder in _FOLDERS.values()
                                    for name, path in folder.tables.items()}}


# Subfolders of an included folder that hold table specs and claims files, not lm-eval tasks.
NOT_TASKS = ("tables", "claims")


def _read_folder(root: Path) -> IncludedFolder:
    tasks: dict[str, Path] = {}
    for path in sorted(root.rglob("*.yaml")):
        # A folder named x.yaml is a folder, as lm-eval's index takes it (it skips what it
        # cannot read as a file, and indexes the YAML inside).
        if not path.is_file() or "__pycache__" in path.parts or any(
                path.is_relative_to(root / apart) for apart in NOT_TASKS):
            continue
        for name in task_names(load_yaml(path, TaskYamlLoader)):
            require(name not in tasks, f"{path}: task {name} is also defined by {tasks.get(name)}")
            tasks[name] = path
    tables = {}
    for path in sorted((root / "tables").glob("*.yaml")):
        load_yaml(path)  # a syntax error: one line now, not when a report asks for the table
        tables[path.stem] = path
    return IncludedFolder(root, tasks, tables)


def task_names(config: dict[str, Any]) -> list[str]:
    """The task or group a YAML defines for lm-eval's index (tags, which many files share,
    are not looked up here)."""
    return [config[key] for key in ("task", "group") if isinstance(config.get(key), str)]


@cache  # the shipped folders do not change while hydrabench runs
def _shipped_tasks() -> dict[str, Path]:
    """Every task and group name the shipped task folders define (tiny/, offline/, hub/...)."""
    names: dict[str, Path] = {}
    for root in sorted(p for p in TASKS_DIR.iterdir() if p.is_dir() and p.name != "tables"):
        for path in sorted(root.rglob("*.yaml")):
            try:
                for name in task_names(load_yaml(path, TaskYamlLoader)):
                    names.setdefault(name, path)
            except SpecError:  # not a mapping, or a shipped file lm-eval skips: no name
                continue
    return names


def _shipped_tables() -> dict[str, Path]:
    return {path.stem: path for path in sorted((TASKS_DIR / "tables").glob("*.yaml"))}


def task_config(task: str) -> tuple[dict[str, Any], list[Path]]:
    """An included task's YAML merged over what it `include:`s, and the files that adds: each
    included YAML, followed recursively, and the Python modules their `!function` tags name."""
    folder = folder_of(task)
    if folder is None:
        raise SpecError(f"task {task} is in no included folder")
    read: list[Path] = []
    return _with_includes(folder.tasks[task].resolve(), read, set()), read


def _with_includes(path: Path, read: list[Path], seen: set[Path]) -> dict[str, Any]:
    """`path`'s config as lm-eval's load_yaml merges it: each include (a name or a list,
    relative to the including file's real folder, or absolute) under it, in order, local keys
    winning, `task_list` not inherited. A missing include or a cycle is not followed further:
    lm-eval refuses those itself, naming them, before any work."""
    seen.add(path)
    config = load_yaml(path, TaskYamlLoader)
    parents = config.pop("include", None)
    merged: dict[str, Any] = {}
    for parent in parents if isinstance(parents, list) else [parents]:
        if not isinstance(parent, str):
            continue
        target = (path.parent / parent).resolve()
        if target in seen or not target.is_file():
            continue
        read += [target, *_function_modules(target)]
        inherited = _with_includes(target, read, seen)
        inherited.pop("task_list", None)
        merged.update(inherited)
    return {**merged, **config}


def _function_modules(path: Path) -> list[Path]:
    """The files lm-eval imports for the `!function a.b.f` tags of a task YAML: a/b.py beside it,
    where that file exists (otherwise an installed module)."""
    modules: list[Path] = []

    class Loader(TaskYamlLoader):
        pass

    def function(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
        name = loader.construct_scalar(node)
        module = path.parent / f"{name.rpartition('.')[0].replace('.', '/')}.py"
        if module.is_file():
            modules.append(module.resolve())
        return name

    Loader.add_constructor("!function", function)
    load_yaml(path, Loader)
    return modules


def data_files(config: dict[str, Any]) -> list[Path]:
    """The local files a task's config reads as its data: `dataset_path` when it is a local
    path, and every file its `dataset_kwargs: data_files` match (a path or glob, a list of them,
    or splits of them), found as `datasets` finds them: relative to `data_dir`, the dataset's
    folder or the working directory, hidden files only when asked for, each pattern's matches
    sorted. Remote files (a URL) are named by the config itself."""
    from datasets.data_files import resolve_pattern, sanitize_patterns

    path = config.get("dataset_path")
    local = Path(path) if isinstance(path, str) and Path(path).exists() else None
    kwargs = config.get("dataset_kwargs")
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    subfolder = kwargs.get("data_dir") if isinstance(kwargs.get("data_dir"), str) else ""
    base = (local / subfolder if local and local.is_dir() else Path(subfolder)).resolve()
    files = [local] if local else []
    try:
        splits = sanitize_patterns(kwargs["data_files"]) if kwargs.get("data_files") else {}
    except (TypeError, ValueError):  # a shape `datasets` refuses itself when the task loads
        return files
    for pattern in (p for patterns in splits.values() for p in patterns):
        if not isinstance(pattern, str) or "://" in pattern:
            continue
        try:
            files += [Path(f) for f in sorted(resolve_pattern(pattern, str(base)))]
        except FileNotFoundError:  # datasets names it when the task loads
            continue
    return files


def spec_folders(spec: RunSpec) -> list[str]:
    """The folders a resolved spec's included tasks came from, as its task fingerprints name
    them."""
    return sorted({fp["include_path"] for fp in spec.inputs.tasks.values()
                   if "include_path" in fp})


def include_from_spec(spec: RunSpec) -> None:
    """Include the spec's folders: a Slurm job rebuilds the spec in a fresh process that saw no
    --include-path."""
    include(spec_folders(spec), f"run {spec.run_id}: included task folder")


def recorded_folders(profile: dict[str, Any] | None, spec: RunSpec) -> list[str]:
    """The task folders a record says its run was made with: its profile's include_path, the
    folders its task fingerprints name, and the include_path of the profile file it names as
    that file reads now (one that reappeared may name others): checked before any is read."""
    named = (profile or {}).get("include_path") or []
    folders = [named] if isinstance(named, str) else list(named) if isinstance(named, list) else []
    folders += load_profile(spec.profile).include_path
    folders += [fp.get("include_path") for fp in spec.inputs.tasks.values()
                if isinstance(fp, dict)]
    return sorted({folder for folder in folders if isinstance(folder, str)})


T = TypeVar("T")


def refuse_folders_not_named(run_id: str, folders: Iterable[str], resolve: Callable[[], T]) -> T:
    """`resolve()` (a spec rebuilt from a record), refused in one line where the record's task
    folders, or folders that resolving it included (a profile file the record names), are not
    this command line's (--include-path, --profile's include_path): lm-eval imports a task
    folder's Python, and a record is data (docs/security.md)."""
    named = set(_FOLDERS)

    def refuse(folder: str | Path) -> SpecError:
        return SpecError(f"run {run_id} was made with --include-path {folder}; pass it again "
                         "to use it")

    for folder in folders:
        if Path(folder).resolve() not in named:
            raise refuse(folder)
    resolved = resolve()
    added = sorted(set(_FOLDERS) - named)
    for root in added:  # read as YAML only; forgotten before any task is loaded
        del _FOLDERS[root]
    if added:
        raise refuse(added[0])
    return resolved
