"""Host work in processes beside a device worker, and the shared memory its batches travel through.

Why processes: aclruntime keeps Python's GIL for the whole of a device call
(docs/throughput.md#the-gil), so while an NPU runs a batch no other thread of the
worker's process can run. The process that holds the session therefore makes only
the device calls; reading, cropping, building inputs, merging and decoding run in
``HostPool``'s processes on the same node.

A batch's arrays never travel by pickle. ``BatchSlots`` is one shared file mapping
cut into equal slots: a host process writes a batch's inputs into a slot, the device
thread hands views of them to the backend and writes the outputs beside them, and a
host process decodes them in place. Only box ids, crop boxes, keypoints and timings
go through the pipes (docs/throughput.md#host-processes says why this design).

A host process runs top-level functions ``fn(state, *args)``: ``state`` is its
``HostState`` (the mapped slots, its image cache). Nothing here starts a thread: the
worker's device thread sends the work, and between two device calls takes the
answers (``HostPool.answers``) and hands out free slots (``BatchSlots.when_free``),
so no other thread of its process asks for the GIL while a device call holds it.
A process that dies fails its pending work with ``HostProcessDied`` and refuses new
work: the worker is broken.
"""
from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from cluster.errors import WorkerBroken

#: Every array in a slot starts on a cache line.
ALIGN = 64
#: Seconds a fresh host process may take to import and map the slots.
START_TIMEOUT_S = 120.0
#: Batches in flight past those the host processes prepare: one on the device, one queued, one decoding.
SLOTS_PAST_PROCESSES = 3
#: Where slots are mapped, first that has room: memory-backed where the host has it.
SLOT_DIRS = ("/dev/shm", tempfile.gettempdir())


class HostProcessDied(WorkerBroken):
    """A host process of this worker exited; the worker cannot run more batches."""


@dataclass(frozen=True)
class ArraySpec:
    """Where one array lies in the slot file: byte offset, shape, dtype name."""

    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def slot_room(nbytes: Sequence[int]) -> int:
    """Bytes a slot needs to hold arrays of these sizes one after another."""
    return sum(_aligned(n) for n in nbytes)


class SlotMemory:
    """A mapping of the slot file, in the device process or in a host process."""

    def __init__(self, path: str, slots: int, slot_bytes: int) -> None:
        self.slots, self.slot_bytes = slots, slot_bytes
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), slots * slot_bytes)

    def put(self, slot: int, arrays: Sequence[np.ndarray], after: Sequence[ArraySpec] = ()) -> list[ArraySpec]:
        """Copy ``arrays`` into ``slot``, past the arrays ``after`` (already there); their specs."""
        writer = self.writer(slot, after)
        for a in arrays:
            np.copyto(writer.empty(a.shape, a.dtype), a)
        return writer.specs

    def writer(self, slot: int, after: Sequence[ArraySpec] = ()) -> SlotWriter:
        """Arrays made in ``slot`` one after another, past the arrays ``after``."""
        return SlotWriter(self, slot, after)

    def view(self, spec: ArraySpec) -> np.ndarray:
        count = math.prod(spec.shape)
        return np.frombuffer(self._map, spec.dtype, count, spec.offset).reshape(spec.shape)

    def views(self, specs: Sequence[ArraySpec]) -> list[np.ndarray]:
        return [self.view(s) for s in specs]


class SlotWriter:
    """``empty(shape, dtype)`` makes an array in the slot, as ``np.empty`` would in fresh memory;
    ``specs`` says where each lies, for the process that reads them."""

    def __init__(self, memory: SlotMemory, slot: int, after: Sequence[ArraySpec] = ()) -> None:
        self._memory, self._slot = memory, slot
        self._end = (slot + 1) * memory.slot_bytes
        self._at = _aligned(max((s.end for s in after), default=slot * memory.slot_bytes))
        self.specs: list[ArraySpec] = []

    def empty(self, shape: Sequence[int], dtype) -> np.ndarray:
        spec = ArraySpec(self._at, tuple(int(n) for n in shape), np.dtype(dtype).str)
        if spec.end > self._end:
            raise ValueError(f"slot {self._slot} holds {self._memory.slot_bytes} bytes; arrays up to byte "
                             f"{spec.end - self._end + self._memory.slot_bytes} do not fit")
        self.specs.append(spec)
        self._at = _aligned(spec.end)
        return self._memory.view(spec)


class BatchSlots(SlotMemory):
    """The device process's side: makes the file, hands out free slots, removes the file's name.

    The name is removed as soon as every host process has mapped it, so nothing is
    left in ``/dev/shm`` however the worker ends. Slots are handed out and freed on
    the device thread only.
    """

    def __init__(self, slots: int, slot_bytes: int) -> None:
        slot_bytes = _aligned(slot_bytes)
        fd, self.path = tempfile.mkstemp(prefix="runner-slots-", dir=_slot_dir(slots * slot_bytes))
        try:
            os.ftruncate(fd, slots * slot_bytes)
        finally:
            os.close(fd)
        super().__init__(self.path, slots, slot_bytes)
        self._free = list(range(slots))
        self._waiting: deque[tuple[Callable[[int, float], None], float]] = deque()
        self._last_start = 0.0

    def when_free(self, start: Callable[[int, float], None]) -> None:
        """``start(slot, waited)`` now if a slot is free, else when one is (first come, first served).

        ``waited``: the seconds this request was the next in line and no slot was free
        (every slot in flight: the device or the host processes are behind); summed over
        requests it never exceeds the wall time.
        """
        self._waiting.append((start, time.perf_counter()))
        self._start_waiting()

    def release(self, slot: int) -> None:
        self._free.append(slot)
        self._start_waiting()

    def _start_waiting(self) -> None:
        while self._free and self._waiting:
            start, asked = self._waiting.popleft()
            now = time.perf_counter()
            waited, self._last_start = now - max(asked, self._last_start), now
            start(self._free.pop(), waited)

    def unlink(self) -> None:
        Path(self.path).unlink(missing_ok=True)


def _slot_dir(nbytes: int) -> str:
    for d in SLOT_DIRS:
        if os.path.isdir(d) and os.access(d, os.W_OK):
            st = os.statvfs(d)
            if st.f_bavail * st.f_frsize > 2 * nbytes:
                return d
    raise OSError(f"no room for {nbytes / 2**20:.0f} MiB of batch slots in {' or '.join(SLOT_DIRS)}: "
                  "free space there, or lower --bs")


class ImageCache:
    """The last few decoded images of one host process: consecutive boxes mostly share an image."""

    def __init__(self, size: int = 16) -> None:
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._size = size

    def get(self, path: str, read: Callable[[str], np.ndarray]) -> np.ndarray:
        if path in self._items:
            self._items.move_to_end(path)
            return self._items[path]
        image = read(path)
        self._items[path] = image
        while len(self._items) > self._size:
            self._items.popitem(last=False)
        return image


@dataclass
class HostState:
    """What a host process keeps between the calls it runs."""

    memory: SlotMemory
    images: ImageCache


class HostProcess:
    """One host process; ``submit`` returns a future, resolved when ``take_answer`` reads its answer.

    A fresh interpreter (``python -c``), not a fork or multiprocessing's spawn: a Ray
    worker's threads do not survive a fork, and spawn would run the parent's
    ``__main__`` again (Ray's worker script, a user's script) in every child.
    """

    def __init__(self, name: str, slots: BatchSlots, opencv_threads: int) -> None:
        ours, theirs = socket.socketpair()
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOT, json.dumps(sys.path), str(theirs.fileno()), str(os.getpid()), slots.path,
             str(slots.slots), str(slots.slot_bytes), str(opencv_threads)],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        self.connection = Connection(ours.detach())
        self._lock = threading.Lock()  # submit on the device thread, close on the actor's: one sender at a time
        self._pending: dict[int, Future] = {}
        self._next = 0
        self.died: HostProcessDied | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def pending(self) -> int:
        return len(self._pending)

    def wait_ready(self, timeout: float) -> None:
        """Wait for the process to say it has mapped the slots; its death or silence is raised."""
        if not self.connection.poll(timeout):
            raise TimeoutError(f"host process {self.name} (pid {self.pid}) did not start in {timeout:.0f} s")
        try:
            receive(self.connection)
        except (EOFError, OSError):
            self._fail_all()
            raise self.died from None

    def submit(self, fn: Callable, *args) -> Future:
        """Run ``fn(state, *args)`` in the process; its result or error comes back through the future."""
        done: Future = Future()
        with self._lock:
            if self.died is None:
                self._next += 1
                try:
                    send(self.connection, (self._next, fn, args))
                    self._pending[self._next] = done
                    return done
                except OSError:  # it died and nobody has read its end yet
                    pass
        self._fail_all()
        raise self.died

    def take_answer(self) -> None:
        """Resolve the future of the next answer in the pipe; its callbacks run here.

        Called when the pipe is readable; an end of file is the process's death: every
        pending future fails with it.
        """
        try:
            key, ok, value = receive(self.connection)
        except (EOFError, OSError):
            self._fail_all()
            return
        with self._lock:
            done = self._pending.pop(key)
        done.set_result(value) if ok else done.set_exception(value)

    def _death(self) -> HostProcessDied:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return HostProcessDied(f"host process {self.name} (pid {self.pid}) ended ({how}): "
                               "this worker stops; its shards run on the others")

    def _fail_all(self) -> None:
        with self._lock:
            if self.died is None:
                self.died = self._death()
            pending, self._pending = list(self._pending.values()), {}
        for done in pending:
            done.set_exception(self.died)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the process; work still pending fails (nobody would read its answers)."""
        with self._lock:
            if self.died is None:
                try:
                    send(self.connection, None)
                except OSError:  # it has just died: waiting below is all there is to do
                    self.process.kill()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._fail_all()
        self.connection.close()


#: A host process's first lines: the parent's import path, then ``main`` with the rest of argv.
_BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
         "from cluster.host_work import main; main(sys.argv[2:])")


class HostPool:
    """A device worker's host processes and the slots, of ``slot_bytes`` each, they share with its device thread."""

    def __init__(self, processes: int, slot_bytes: int, opencv_threads: int, name: str = "host",
                 wake_on: int | None = None) -> None:
        processes = max(1, processes)
        self.slots = slots = BatchSlots(processes + SLOTS_PAST_PROCESSES, slot_bytes)
        self.processes = [HostProcess(f"{name}-{i}", slots, opencv_threads) for i in range(processes)]
        try:
            for p in self.processes:
                p.wait_ready(START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        finally:
            slots.unlink()  # mapped by all (or given up): the name is no longer needed
        # One poll serves every wait of the device thread (several a chunk): each live process's pipe, and
        # ``wake_on`` (the worker's wake-up pipe, which its owner drains)
        self._poll = select.poll()
        self._live = {p.connection.fileno(): p for p in self.processes}
        for fd in [*self._live, *([wake_on] if wake_on is not None else [])]:
            self._poll.register(fd, select.POLLIN)

    def least_busy(self) -> HostProcess:
        return min(self.processes, key=lambda p: p.pending)

    def answers(self, timeout: float | None) -> None:
        """Take an answer from each process that has one, after waiting up to ``timeout`` seconds (None: no
        limit) for one, or for ``wake_on`` to be readable."""
        for fd, _ in self._poll.poll(None if timeout is None else timeout * 1000):
            process = self._live.get(fd)
            if process is None:  # wake_on
                continue
            process.take_answer()
            if process.died is not None:  # its pipe stays readable (end of file): no longer watched
                self._poll.unregister(fd)
                del self._live[fd]

    def close(self) -> None:
        for p in self.processes:
            p.close()


def main(argv: list[str]) -> None:
    """A host process: ``fd parent_pid slot_path slots slot_bytes opencv_threads`` (``HostProcess``)."""
    fd, parent, path, slots, slot_bytes, opencv_threads = argv
    serve(Connection(int(fd)), int(parent), path, int(slots), int(slot_bytes), int(opencv_threads))


def serve(conn: Connection, parent: int, path: str, slots: int, slot_bytes: int, opencv_threads: int) -> None:
    """A host process's loop: run each ``(key, fn, args)`` it is sent; answer ``(key, ok, value)``."""
    _die_with_parent(parent)
    reuse_freed_memory()
    if hasattr(os, "SCHED_BATCH"):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle, not ours
    if opencv_threads:
        import cv2

        cv2.setNumThreads(opencv_threads)
    state = HostState(SlotMemory(path, slots, slot_bytes), ImageCache())
    send(conn, (0, True, os.getpid()))
    while (item := receive(conn)) is not None:
        key, fn, args = item
        try:
            answer = (key, True, fn(state, *args))
        except Exception as e:  # sent back whole, so the worker raises it where the work was asked for
            answer = (key, False, _sendable(e))
        send(conn, answer)


def send(conn: Connection, message) -> None:
    """One message down a host pipe: plain pickle (multiprocessing's own pickler copies its dispatch table
    for every message, and nothing sent here needs its reducers)."""
    conn.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))


def receive(conn: Connection):
    return pickle.loads(conn.recv_bytes())


def _sendable(error: Exception) -> Exception:
    """``error`` if it survives pickling, else a RuntimeError with its text and where it was raised."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        where = "".join(traceback.format_exception(error)[-3:]).strip()
        return RuntimeError(f"{type(error).__name__}: {error} ({where})")


def reuse_freed_memory() -> None:
    """glibc: serve arrays of up to 32 MiB from the heap and keep what is freed, rather than map fresh pages.

    A batch's arrays (crops, inputs, heatmaps: a few MB each) are made and freed per
    batch. By default glibc maps each afresh and unmaps it when freed, so every batch
    pays a page fault per 4 KiB of them: on this project's 2-core VM, normalising 16
    crops took 47.9 ms into fresh memory and 2.9 ms into reused memory.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform.startswith("linux") else None
    if mallopt is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3
        mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value on 64-bit
        mallopt(m_trim_threshold, 256 << 20)


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this process when the worker's process dies, however it dies."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the call above took effect
            os._exit(1)
