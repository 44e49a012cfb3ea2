"""The one way hydrabench writes a file: into a temp file in the same directory, renamed into
place, so a reader or a crash never sees half a file. The mode is what a plain open() gives (0666
less the umask): mkstemp's 0600 would keep colleagues on a shared cluster from reading records.
`durable` files (records, artifacts, checkpoints) are fsync'd first, so a crash after the rename
cannot leave an empty file under the final name. A temp file names its writer (pid@host), so that
the next writer of the same file removes one a killed process left; a full disk is one error
naming the file, the bytes it needed and those free."""

from __future__ import annotations

import errno
import glob
import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def as_umask_allows(path: Path) -> None:
    """The mode a plain open() or mkdir() would give (0666 or 0777 less the umask): mkstemp and
    mkdtemp make 0600 and 0700."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


# What a full disk (or quota) raises.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _dead_owner(temp: Path, path: Path) -> bool:
    """The temp file's writer was a process of this host that no longer exists. Temps of
    another host, of a live process, or without an owner (older hydrabench) are not known dead."""
    owner = temp.name.removeprefix(_temp_prefix(path)).removesuffix(".tmp").rpartition(".")[0]
    pid, _, host = owner.partition("@")
    if not pid.isdigit() or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False  # alive


def remove_stale_temps(path: Path, *, every: bool = False) -> None:
    """Remove the temp files that killed writers of `path` left beside it: those of dead
    processes; `every` one when the caller holds the lock its writers take (then none is in
    flight: a training's checkpoint under its train lock)."""
    if not path.parent.is_dir():
        return
    for temp in path.parent.glob(f"{glob.escape(_temp_prefix(path))}*.tmp"):
        if every or _dead_owner(temp, path):
            temp.unlink(missing_ok=True)


def _human(size: float) -> str:
    """Bytes as people read them: 812 B, 4.1 kB, 3.2 GB."""
    power = min(3, int(math.log10(size) // 3)) if size >= 1000 else 0
    return f"{size:.0f} B" if power == 0 else f"{size / 1000 ** power:.1f} {'kMG'[power - 1]}B"


def _no_space(err: BaseException) -> OSError | None:
    """The full-disk OSError behind `err`: itself, or the one a writer was handling when it
    raised its own (torch's writer fails closing the file after the OSError)."""
    for cause in (err, err.__context__):
        if isinstance(cause, OSError) and cause.errno in NO_SPACE:
            return cause
    return None


@contextmanager
def atomic_path(path: Path, durable: bool = False, size: int | None = None) -> Iterator[Path]:
    """A temp file beside `path` for the block to write; renamed to `path` when the block
    finishes, removed when it raises. A full disk raises an OSError naming `path`, the bytes
    it needed (`size` where the caller knows it, else more than were written) and those free."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{_temp_prefix(path)}{_owner()}.",
                                suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        as_umask_allows(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        full = _no_space(err)
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if full is None:
            raise
        needed = _human(size) if size is not None else f"more than {_human(written)}"
        free = _human(shutil.disk_usage(path.parent).free)
        raise OSError(full.errno, f"{full.strerror} (needs {needed}, {free} free)",
                      str(path)) from None


def write_bytes_atomic(path: Path, data: bytes, durable: bool = False) -> None:
    with atomic_path(path, durable, size=len(data)) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str, durable: bool = False) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), durable)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Records and other JSON the harness reads back: durable."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n", durable=True)
