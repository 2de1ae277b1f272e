"""What every device worker is: one process, one device, one inference session that one thread owns.

``DeviceWorker`` is the base of the pose ``cluster.actor.Worker`` and the detector's
``cluster.detect_actor.DetectWorker``; ``cluster.pool`` turns them into Ray actors
pinned to their device. Its device thread opens the session, warms it up, runs
the work queued for it back to back, and closes it: ais_bench sessions are not
thread-safe, and before 2024 their ACL context is current only on the thread that
made them, so every call of a session comes from that one thread, whatever the
backend. It is also the only thread of the process that runs while a shard is in
flight: between two pieces of work it takes the answers of the worker's host
processes (``cluster.host_work``), whose callbacks queue the next, and when there
is nothing to do it waits for either. aclruntime keeps the GIL for a whole device
call, so any other thread would wake during the call and take the GIL from the
device thread at its end (docs/throughput.md#the-gil). ``describe()`` says where
the worker landed; ``close()`` frees the session and stops the thread.
"""
from __future__ import annotations

import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from functools import partial

from cluster.host_work import HostPool
from tasks.errors import UserError

#: The variable Ray sets to pin an actor to its accelerator, by slot kind (docs/ascend.md#ray-pinning).
VISIBILITY_VARS = {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}


@dataclass(frozen=True)
class WorkerPlace:
    """Where a worker runs and what it opens there (``cluster.placement.worker_place``)."""

    backend: str
    compute_device: str  # what the backend opens, as this process sees it: 'cpu', 'cuda:0', 'npu:0'
    label: str  # provisional; the driver names the device once Ray has placed the actor
    kind: str  # the slot the actor holds: 'cpu' | 'cuda' | 'npu'
    threads: int  # the backend's CPU threads
    opencv_threads: int = 0  # OpenCV's pool in this process (cluster.placement.opencv_threads); 0: its default
    chip: int | None = None  # the NPU's logical id that compute_device opens (pin_npu); None: no NPU opened


class ShardDropped(Exception):
    """Work of a shard that has failed already: not done (``DeviceWorker.fail`` has the shard's error)."""


class PinningError(UserError, RuntimeError):
    """The NPU Ray assigned a worker is not one its process can see; one line."""


class DeviceWorker:
    """Subclasses say how their session opens (``open_session``), warms up and closes.

    ``self.config`` is the subclass's config; it has a ``place`` (``WorkerPlace``).
    """

    def __init__(self, config) -> None:
        if config.place.compute_device.startswith("npu"):
            config = replace(config, place=pin_npu(config.place))
        self.config = config
        if config.place.opencv_threads:
            import cv2

            cv2.setNumThreads(config.place.opencv_threads)
        self.session = None  # the device thread's: it opens, runs and closes it
        self.host: HostPool | None = None  # the subclass's host processes, whose answers the device thread takes
        self.idle_seconds = 0.0  # the device thread's waits for work or answers, summed; take_idle zeroes it
        self._shards: set[Future] = set()  # the shards in flight, by their futures (begin, end, fail)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # (work, future), then None to stop
        self._bell, self._ring = os.pipe()  # a byte written on queueing wakes the device thread's wait
        os.set_blocking(self._bell, False)
        os.set_blocking(self._ring, False)
        self._lock = threading.Lock()
        self._closing = False
        opened: Future = Future()
        self._device_thread = threading.Thread(target=self._device_loop, args=(opened,), name="device", daemon=True)
        self._device_thread.start()
        try:
            opened.result()  # an open error is raised here, so the actor fails to start with its line
        except BaseException:
            os.close(self._ring)
            raise

    # ------------------------------------------------------------ what a subclass says

    def open_session(self, config):
        """On the device thread: open the session ``config`` names."""
        raise NotImplementedError

    def warm_up(self, session, config) -> None:
        """On the device thread: the first calls of a fresh session, outputs dropped (setup, not throughput)."""

    def close_session(self, session) -> None:
        """On the device thread: free the session (an OM's model leaves the device)."""
        session.close()

    def start_host(self, processes: int, slot_bytes: int, name: str = "host") -> None:
        """Start the subclass's host processes (``HostPool``), whose answers the device thread takes from
        now on; a failure closes the worker and is raised."""
        try:
            pool = HostPool(processes, slot_bytes, self.config.place.opencv_threads, name, wake_on=self._bell)
        except BaseException:
            self.close()
            raise
        self.host = pool  # the wake-up pipe is watched first: the device thread may wait on the pool at once

    # ------------------------------------------------------------ the device thread

    def on_device(self, work: Callable[[], object]) -> Future:
        """Queue ``work()`` for the device thread; its result or error comes back through the future."""
        with self._lock:
            if self._closing:
                raise RuntimeError(f"worker {self.config.place.label} is closed")
            done: Future = Future()
            self._queue_locked((work, done))
        return done

    def _queue_locked(self, *items) -> None:
        """Queue ``items`` and wake the device thread; under ``self._lock`` (close() closes the pipe after)."""
        for item in items:
            self._queue.put(item)
        if threading.get_ident() == self._device_thread.ident:  # queued by its own callbacks: it is awake
            return
        try:
            os.write(self._ring, b"w")
        except BlockingIOError:  # the pipe is full of earlier rings: the device thread wakes anyway
            pass

    # ------------------------------------------------------------ shards in flight, on the device thread

    def begin(self, done: Future) -> None:
        """A shard starts; ``done`` resolves through ``end`` or ``fail``. The first of a spell zeroes the idle time
        (the wait for it is not the device waiting for the host)."""
        if not self._shards:
            self.idle_seconds = 0.0
        self._shards.add(done)

    def end(self, done: Future, value) -> None:
        self._shards.discard(done)
        if not done.done():
            done.set_result(value)

    def fail(self, done: Future, error: BaseException) -> None:
        """The shard fails with ``error`` (the first error wins; the rest of its work is dropped)."""
        self._shards.discard(done)
        if not done.done():
            done.set_exception(error)

    def then(self, done: Future, work: Callable[[Future], None]) -> Callable[[Future], None]:
        """A done-callback for host work of the shard ``done``: ``work(future)``, where the future resolves
        (the device thread, which takes the answers); whatever it raises fails the shard (a callback's own
        error would only be logged)."""
        def callback(future: Future) -> None:
            try:
                work(future)
            except BaseException as e:
                self.fail(done, e)
        return callback

    def prepare_in(self, done: Future, slot: int, submit: Callable[[], Future],
                   step: Callable[[Future], None]) -> None:
        """Host work into ``slot`` for the shard ``done`` (``submit()`` sends it to a host process), then
        ``step(its future)`` queued on the device thread: the device's calls wait their turn. A failure
        frees the slot and fails the shard."""
        try:
            if done.done():  # the shard failed: the rest of its work need not run
                raise ShardDropped
            future = submit()
        except BaseException as e:
            self.host.slots.release(slot)
            self.fail(done, e)
            return
        future.add_done_callback(self.then(done, lambda f: self.on_device(partial(step, f))))

    def take_idle(self) -> float:
        """The device thread's idle seconds since the last call of this; zeroed."""
        idle, self.idle_seconds = self.idle_seconds, 0.0
        return idle

    def reopen(self, config) -> None:
        """On the device thread: the session for ``config`` instead of the current one.

        The old session is closed first (one model on the device at a time); a failed
        open leaves no session, and the config unchanged.
        """
        self._close_current()
        self.session = self._open_warm(config)
        self.config = config

    def _open_warm(self, config):
        session = self.open_session(config)
        try:
            self.warm_up(session, config)
        except BaseException:
            self.close_session(session)
            raise
        return session

    def _close_current(self) -> None:
        session, self.session = self.session, None  # dropped even if closing raises
        if session is not None:
            self.close_session(session)

    def _device_loop(self, opened: Future) -> None:
        try:
            self.session = self._open_warm(self.config)
        except BaseException as e:
            os.close(self._bell)
            opened.set_exception(e)
            return
        opened.set_result(None)
        while (item := self._next_work()) is not None:
            work, done = item
            try:
                done.set_result(work())
            except BaseException as e:  # raised again in the thread that queued it
                done.set_exception(e)
        os.close(self._bell)

    def _next_work(self):
        """The next queued work, taking the host processes' answers first (their callbacks queue work).

        Waits, without a time limit, for work or an answer when there is neither.
        """
        while True:
            if self.host is not None:
                self.host.answers(0)
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                pass
            t0 = time.perf_counter()
            if self.host is not None:
                self.host.answers(None)
            else:
                select.select([self._bell], [], [])
            self.idle_seconds += time.perf_counter() - t0
            try:
                os.read(self._bell, 4096)
            except BlockingIOError:  # woken by an answer, not a ring
                pass

    # ------------------------------------------------------------ the actor's methods

    def describe(self) -> dict:
        return describe_placement(self.config.place)

    def close(self) -> None:
        """Close the session on the device thread and stop it, then the host processes (nothing reaches them
        after); idempotent."""
        try:
            self._stop_device_thread()
        finally:
            if self.host is not None:
                self.host.close()

    def _stop_device_thread(self) -> None:
        with self._lock:
            if self._closing or not self._device_thread.is_alive():
                return
            self._closing = True
            closed: Future = Future()
            self._queue_locked((self._close_current, closed), None)
        self._device_thread.join()
        os.close(self._ring)
        for done in list(self._shards):  # nothing will finish them now
            self.fail(done, RuntimeError(f"worker {self.config.place.label} closed while a shard ran"))
        closed.result()


def describe_placement(place: WorkerPlace) -> dict:
    """Where a worker landed: the driver names the device from it and writes OUT/devices.json.

    ``visible_devices`` is the visibility variable Ray set for this actor
    (ASCEND_RT_VISIBLE_DEVICES for an NPU slot, CUDA_VISIBLE_DEVICES for a GPU): one id
    per actor when pinning works.
    """
    node_id, node_ip, accelerator_ids = _ray_placement()
    host = socket.gethostname()
    var = VISIBILITY_VARS.get(place.kind)
    return {"device": place.label, "kind": place.kind, "compute_device": place.compute_device,
            "backend": place.backend,
            # Simulated nodes share a hostname; the node id prefix tells them apart.
            "node": f"{host}/{node_id[:8]}" if node_id else host, "host": host, "node_ip": node_ip,
            "node_id": node_id, "pid": os.getpid(), "accelerator_ids": accelerator_ids,
            "visible_devices": os.environ.get(var) if var else None, "threads": place.threads,
            "chip": place.chip}


def pin_npu(place: WorkerPlace) -> WorkerPlace:
    """``place`` opening the NPU Ray assigned this actor, whatever ASCEND_RT_VISIBLE_DEVICES lists.

    Ray sets the variable to the one assigned chip, so the device is 0, unless
    RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES was set where the node started
    (``ray job submit`` drivers, many Ascend setups): then every actor sees every chip
    and device 0 is the same chip for all (docs/ascend.md#ray-pinning).
    """
    _, _, accelerators = _ray_placement()
    index = int(place.compute_device.partition(":")[2] or 0)
    user, chip = npu_user_id(os.environ.get(VISIBILITY_VARS["npu"]), accelerators.get("NPU", []), index)
    return replace(place, compute_device=f"npu:{user}", chip=chip)


def npu_user_id(visible: str | None, assigned: Sequence[str], index: int = 0) -> tuple[int, int | None]:
    """(the ACL device id to open, the logical id of that chip) in a process whose visibility variable
    is ``visible`` and to which Ray ``assigned`` these NPU ids (none outside Ray: ``index`` is opened).

    The variable lists logical ids and the process sees them as 0..k-1 in that order
    (docs/ascend.md#device-ids); unset, device ids are the logical ids.
    """
    listed = _listed_ids(visible)
    if not assigned:
        if listed is None:
            return index, index
        return index, listed[index] if index < len(listed) else None
    chip = int(assigned[0])
    if listed is None:
        return chip, chip
    if chip not in listed:
        raise PinningError(f"Ray assigned this worker NPU {chip} but its ASCEND_RT_VISIBLE_DEVICES={visible!r} "
                           "does not list it: start the node's Ray with that variable listing the chips it "
                           "schedules, or unset it there")
    return listed.index(chip), chip


def _listed_ids(visible: str | None) -> list[int] | None:
    """The logical ids of ASCEND_RT_VISIBLE_DEVICES; CANN stops reading at the first entry that is not one."""
    if visible is None:
        return None
    ids: list[int] = []
    for part in visible.split(","):
        if not part.isdigit():
            break
        ids.append(int(part))
    return ids


def _ray_placement() -> tuple[str, str, dict[str, list[str]]]:
    """(node id, node IP, accelerator ids by resource) when running in a Ray actor."""
    try:
        import ray
    except ImportError:
        return "", "", {}
    if not ray.is_initialized():  # a plain worker, outside Ray
        return "", "", {}
    ctx = ray.get_runtime_context()
    ids = {k: list(v) for k, v in ctx.get_accelerator_ids().items() if v}
    return ctx.get_node_id(), ray.util.get_node_ip_address(), ids
