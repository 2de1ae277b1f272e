"""The model file on nodes that may not share the driver's storage: checked, or shipped through Ray.

    files = model_files(path)                 driver: the model and its companions, each by size and sha256
    shipped = ship_model(files)               driver: their bytes in Ray's object store, once per run
    path, how = local_model(shipped)          worker: the file to open on this node, and how it got here

A worker opens the driver's own path only when this node holds the same bytes there
(size, then sha256, of every file); otherwise it takes them from the node's cache,
``<cache>/<sha256 of the model>/<file name>``, filling it from the object store first.
The companions sit beside the model under their own names, so an OM's ``.json`` sidecar
(its gears, read by ``tasks.backends.om``) is found the way it is on the driver. The
cache is shared by the node's workers and kept between runs: one worker fetches, under
a lock per model, the others wait and find it there.

``how`` is ``local``, ``cached`` or ``shipped``; `` (local copy differs)`` is added when
the driver's path exists on this node with other bytes (a stale copy is never opened).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import UserError
from tasks.files import atomic_file, file_sha256, file_size

#: Files a model consists of besides itself, by the model's suffix: the ``.json`` that
#: tasks/atc.py writes beside an OM (gears) and tasks/export.py beside an ONNX (how it was made).
COMPANIONS = {".om": (".json",), ".onnx": (".json",)}
#: Where a node keeps shipped models, when set; else ``$XDG_CACHE_HOME/runner/models`` (``~/.cache/...``).
NODE_CACHE_ENV = "RUNNER_NODE_CACHE"
LOCAL, CACHED, SHIPPED = "local", "cached", "shipped"
DIFFERS = " (local copy differs)"



class StagingError(UserError):
    """A model file that cannot be found, shipped or stored on a node; one line."""


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelFiles:
    """A model as the driver has it: ``path`` and its companions beside it, the model first."""

    path: Path
    entries: tuple[FileEntry, ...]

    @property
    def main(self) -> FileEntry:
        return self.entries[0]

    def driver_path(self, entry: FileEntry) -> Path:
        return self.path.with_name(entry.name)


@dataclass(frozen=True)
class ShippedModel:
    """What every worker is handed: the files' description and one ObjectRef per file, in order."""

    files: ModelFiles
    refs: tuple


def model_files(path: str | Path) -> ModelFiles:
    """``path`` and the companions present beside it, each with its size and sha256."""
    path = Path(path).resolve()
    if not path.is_file():
        raise StagingError(f"model file {path} not found: the driver cannot ship it to the workers")
    beside = [path.with_suffix(suffix) for suffix in COMPANIONS.get(path.suffix, ())]
    paths = [path, *(p for p in beside if p.is_file())]
    return ModelFiles(path, tuple(FileEntry(p.name, p.stat().st_size, file_sha256(p)) for p in paths))


def ship_model(files: ModelFiles) -> ShippedModel:
    """Each file's bytes put in the object store once; hand the result to every worker.

    The objects live while the caller holds the result (Ray counts the references), so the
    driver keeps it for as long as workers may start. Put as numpy arrays: a worker's
    ``ray.get`` maps them from its node's store without copying them into its heap.
    """
    import numpy as np
    import ray

    refs = []
    for entry in files.entries:
        data = np.memmap(files.driver_path(entry), dtype=np.uint8, mode="r") if entry.size else \
            np.zeros(0, np.uint8)  # mmap cannot map an empty file
        refs.append(ray.put(data.view(np.ndarray)))
        del data
    return ShippedModel(files, tuple(refs))


def node_cache_root(cache_root: str | Path | None = None) -> Path:
    """``cache_root``, else ``$RUNNER_NODE_CACHE``, else ``$XDG_CACHE_HOME/runner/models`` (``~/.cache``)."""
    if cache_root:
        return Path(cache_root)
    if os.environ.get(NODE_CACHE_ENV):
        return Path(os.environ[NODE_CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "runner" / "models"


def local_model(shipped: ShippedModel, cache_root: str | Path | None = None) -> tuple[Path, str]:
    """The path this node opens for ``shipped`` and how it got there (``local``, ``cached``,
    ``shipped``, each maybe with `` (local copy differs)``). StagingError with one line when the
    bytes cannot be fetched or stored."""
    files = shipped.files
    state = local_state(files)
    if state == LOCAL:
        return files.path, LOCAL
    note = DIFFERS if state == "differs" else ""
    root = node_cache_root(cache_root)
    folder = root / files.main.sha256
    if not stale_entries(files, folder):
        return folder / files.main.name, CACHED + note
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f"{files.main.sha256}.lock"):
            # Another worker of this node may have fetched them while this one waited.
            stale = stale_entries(files, folder)
            for k, entry in enumerate(files.entries):
                if entry in stale:
                    _fetch(shipped.refs[k], entry, folder / entry.name)
    except OSError as e:
        raise StagingError(f"node cache {root}: cannot store model {files.main.name} ({e.strerror or e}); "
                           f"free the disk or set {NODE_CACHE_ENV} to a writable folder") from None
    return folder / files.main.name, (SHIPPED if stale else CACHED) + note


def local_state(files: ModelFiles) -> str:
    """``local`` when this node has every file at the driver's paths with the same bytes, ``differs``
    when it has some of them but not those bytes, ``absent`` when it has none."""
    present = [entry for entry in files.entries if files.driver_path(entry).is_file()]
    if not present:
        return "absent"
    # Hashed every time: 0.14 s for 160 MB on this project's 2-core host (page cache warm), and the
    # session reads the file right after; a verdict cached by mtime could be fooled by a same-size rewrite.
    same = len(present) == len(files.entries) and all(_same_bytes(files.driver_path(e), e) for e in present)
    return LOCAL if same else "differs"


def stale_entries(files: ModelFiles, folder: Path) -> list[FileEntry]:
    """The files ``folder`` (a node cache entry) lacks or holds with other bytes.

    The model itself is trusted by name and size: it is written only after its sha256 was
    checked, and under its sha256's folder. Companions are small and may differ for the same
    model (a sidecar names the path it was made from), so they are hashed.
    """
    main, *companions = files.entries
    stale = [] if file_size(folder / main.name) == main.size else [main]
    return stale + [e for e in companions if not _same_bytes(folder / e.name, e)]


def _same_bytes(path: Path, entry: FileEntry) -> bool:
    return file_size(path) == entry.size and file_sha256(path) == entry.sha256


def _fetch(ref, entry: FileEntry, dest: Path) -> None:
    """``entry``'s bytes from the object store into ``dest``, whole or not at all, checked first."""
    import ray

    data = memoryview(ray.get(ref)).cast("B")
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != entry.size or digest != entry.sha256:
        raise StagingError(f"{entry.name}: the bytes shipped from the driver have {len(data)} bytes, sha256 "
                           f"{digest[:12]}, not {entry.size}, {entry.sha256[:12]}: the driver's file changed "
                           "after the run started; run again")
    with atomic_file(dest, "wb") as f:
        # ais_bench refuses group/other-writable model files (docs/ascend.md#ais_bench-sessions).
        os.fchmod(f.fileno(), 0o644)
        f.write(data)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created, never removed: removing it would let two holders in)."""
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
