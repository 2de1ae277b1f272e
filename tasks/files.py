"""Files written whole or not at all, and their sha256.

Every file the project writes for a user or a cache goes through ``atomic_file`` (or,
for a file a tool made, ``move_into_place``): it is written to a temporary name beside
its path and renamed over it only once complete, so a reader never sees half of it. The
temporary name holds a random uuid, so processes on one host or on several hosts sharing
a mount never write the same temporary file; two writers racing for one cache entry both
finish, and the second rename leaves one whole copy.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_size(path: str | Path) -> int | None:
    """``path``'s size in bytes; None where it is absent or cannot be looked at."""
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def temporary_beside(path: str | Path) -> Path:
    """A name in ``path``'s folder that no other writer picks (hidden, ending in .tmp)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """An open temporary file that becomes ``path`` when the block ends without an error.

    Flushed and fsynced before the rename; removed on any error (Ctrl-C included).
    Text modes write UTF-8. The file gets the usual umask permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_parts(path, [text])


def atomic_write_parts(path: str | Path, parts: Iterable[str]) -> None:
    """``parts`` written one after the other, then renamed to ``path``: a large file need not be one string."""
    with atomic_file(path) as f:
        for part in parts:
            f.write(part)


def move_into_place(made: str | Path, path: str | Path) -> None:
    """A complete file a tool wrote (under ``temporary_beside(path)`` or in a work folder on the
    same file system) renamed to ``path``, replacing what was there at once."""
    os.replace(made, path)
