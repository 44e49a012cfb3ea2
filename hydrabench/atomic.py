"""The one way hydrabench writes a file: into a temp file in the same directory, renamed into
place, so a reader or a crash never sees half a file. The mode is what a plain open() gives (0666
less the umask): mkstemp's 0600 would keep colleagues on a shared cluster from reading records.
`durable` files (records, artifacts, checkpoints) are fsync'd first, so a crash after the rename
cannot leave an empty file under the final name."""

from __future__ import annotations

import json
import os
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


@contextmanager
def atomic_path(path: Path, durable: bool = False) -> Iterator[Path]:
    """A temp file beside `path` for the block to write; renamed to `path` when the block
    finishes, removed when it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        as_umask_allows(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes, durable: bool = False) -> None:
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str, durable: bool = False) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), durable)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Records and other JSON the harness reads back: durable."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n", durable=True)
