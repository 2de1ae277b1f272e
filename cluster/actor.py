"""The per-device worker: one process, one device, one inference session.

``Worker`` is a plain class; the driver turns it into a Ray actor with
``ray.remote(...)(Worker)`` and the resources that pin it to its device. It holds
no numerics of its own: prefetch threads prepare crops and network inputs and
queue them for one device thread, which makes the backend calls of
``tasks.pipeline`` back to back; the shard's own thread merges and decodes. It
returns keypoints keyed by box id, never heatmaps unless asked to dump them on
its own side.
"""
from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tasks.backends import open_backend
from tasks.dataset import Box, ImageError, read_rgb
from tasks.deploy import Variant
from tasks.decode import decode_keypoints
from tasks.pipeline import PreparedBatch, merge_outputs, network_inputs, prepare_batch, run_network, warm_up


#: The variable Ray sets to pin an actor to its accelerator, by slot kind (spec ascend.md §4.3).
VISIBILITY_VARS = {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}


@dataclass(frozen=True)
class WorkerConfig:
    backend: str
    model_path: str
    device: str  # what the backend opens, as this process sees it: 'cpu', 'cuda:0', 'npu:0'
    label: str  # provisional; the driver names the device once Ray has placed the actor
    kind: str  # the slot the actor holds: 'cpu' | 'cuda' | 'npu'
    batch_size: int
    threads: int
    prep_threads: int = 1
    flip: bool = True
    dump_dir: str | None = None  # write merged heatmaps here, per shard
    variant: Variant = Variant()  # what the model file computes (tasks.deploy)
    sim_rate: float = 0.0  # network inputs per second, for the sim backend
    opencv_threads: int = 0  # OpenCV's pool in this process (cluster.placement.opencv_threads); 0: its default


@dataclass
class Shard:
    id: int
    boxes: list[Box]
    image_paths: dict[int, str]


@dataclass
class ShardResult:
    shard_id: int
    device: str
    box_ids: np.ndarray  # int64 [n]
    keypoints: np.ndarray  # float32 [n, 17, 3]
    crop_boxes: np.ndarray  # float32 [n, 4]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (box id, reason)
    crops: int = 0  # network inputs computed (padding excluded)
    calls: int = 0
    device_seconds: float = 0.0  # backend compute only
    busy_seconds: float = 0.0  # holding the device: the backend calls
    bytes_to_device: int = 0
    bytes_from_device: int = 0
    started: float = 0.0  # unix time
    finished: float = 0.0
    # device seconds of each backend call, in call order: the reducer's latency distribution
    call_seconds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    host_seconds: dict[str, float] = field(default_factory=dict)  # per stage, HOST_STAGES


#: The host stages a shard times (seconds summed over its batches), by the thread that runs them.
#: Prep threads: read_decode, crop, input. The shard's own thread: prep_wait, device_wait,
#: flip_merge, decode_keypoints. What each counts: cluster.reducer.LABELS.
PREP_STAGES = ("read_decode", "crop", "input")
SHARD_STAGES = ("prep_wait", "device_wait", "flip_merge", "decode_keypoints")
HOST_STAGES = PREP_STAGES + SHARD_STAGES


class _ImageCache:
    """The last few decoded images: consecutive boxes mostly share an image."""

    def __init__(self, size: int = 16) -> None:
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def get(self, path: str) -> np.ndarray:
        with self._lock:
            if path in self._items:
                self._items.move_to_end(path)
                return self._items[path]
        image = read_rgb(path)
        with self._lock:
            self._items[path] = image
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return image


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        if config.opencv_threads:
            import cv2

            cv2.setNumThreads(config.opencv_threads)
        self.backend = None  # the device thread's: it opens, runs and closes it
        # One thread owns the session: ais_bench sessions are not thread-safe, and before
        # 2024 the ACL context is current only on the thread that made the session. That
        # thread also runs the prepared batches of every shard back to back: after a call
        # it takes the next queued item at once (handing the device between shard threads
        # through a lock cost ~1.2 ms per batch in waking the next holder, measured, sim
        # backend). Items are (inputs, future) from _prepare, or (command, future).
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        opened: Future = Future()
        self._device_thread = threading.Thread(target=self._device_loop, args=(opened,), name="device", daemon=True)
        self._device_thread.start()
        opened.result()  # an open error is raised here, so the actor fails to start with its line
        self._images = _ImageCache()
        self._prep = ThreadPoolExecutor(max(1, config.prep_threads), thread_name_prefix="prep")

    def set_batch(self, model_path: str, batch_size: int, dump_dir: str | None = None) -> None:
        """Run the next shards at ``batch_size`` (a sweep's next run), dumping heatmaps to ``dump_dir``.

        The backend is reopened only when the model file changes (a static OM is
        built per batch size); a dynamic-batch session (ONNX, torch) is kept. The
        work runs on the device thread; its error is raised here.
        """
        self._submit(lambda: self._rebatch(model_path, batch_size, dump_dir)).result()

    def _rebatch(self, model_path: str, batch_size: int, dump_dir: str | None) -> None:
        """On the device thread. A failed reopen leaves no session (and no model loaded), the config unchanged."""
        old = self.config
        new = replace(old, model_path=model_path, batch_size=batch_size, dump_dir=dump_dir)
        if model_path != old.model_path or self.backend is None:
            self._close_backend()  # before the next loads: one model on the device at a time
            self.backend = self._open_warm(new)
        elif batch_size != old.batch_size:
            self.backend.batch_size = batch_size
            warm_up(self.backend, new.flip)
        self.config = new

    @staticmethod
    def _open(cfg: WorkerConfig):
        return open_backend(cfg.backend, cfg.model_path, cfg.device, cfg.batch_size, cfg.threads,
                            cfg.variant, cfg.sim_rate)

    def _open_warm(self, cfg: WorkerConfig):
        """Open and warm up (setup, not throughput: before the first shard); closed again if warm-up fails."""
        backend = self._open(cfg)
        try:
            warm_up(backend, cfg.flip)
        except BaseException:
            backend.close()
            raise
        return backend

    def _close_backend(self) -> None:
        backend, self.backend = self.backend, None  # dropped even if close() raises
        if backend is not None:
            backend.close()

    def _submit(self, command: Callable[[], object]) -> Future:
        """Queue ``command()`` for the device thread; its result or error comes back through the future."""
        if not self._device_thread.is_alive():
            raise RuntimeError(f"worker {self.config.label} is closed")
        done: Future = Future()
        self._queue.put((command, done))
        return done

    def describe(self) -> dict:
        return describe_placement(self.config)

    def _device_loop(self, opened: Future) -> None:
        """The device thread: opens the backend, then runs queued items until close() stops it.

        A batch gives (outputs, device seconds, seconds held); a command its own result.
        """
        try:
            self.backend = self._open_warm(self.config)
        except BaseException as e:
            opened.set_exception(e)
            return
        opened.set_result(None)
        while (item := self._queue.get()) is not None:
            work, done = item
            try:
                done.set_result(work() if callable(work) else self._run_batch(work))
            except BaseException as e:  # raised again in the thread that queued it
                done.set_exception(e)

    def _run_batch(self, inputs: list[np.ndarray]) -> tuple[list[np.ndarray], float, float, list[float]]:
        """(outputs, device seconds, seconds held, device seconds of each call)."""
        if self.backend is None:
            raise RuntimeError(f"{self.config.label}: no open session: the last set_batch failed to open its model")
        t0 = time.perf_counter()
        # one run_network per input array, so each call's own device seconds are kept
        calls = [run_network(self.backend, [x]) for x in inputs]
        held = time.perf_counter() - t0
        per_call = [s for _, s in calls]
        return [y for ys, _ in calls for y in ys], sum(per_call), held, per_call

    def _prepare(self, boxes: list[Box], paths: dict[int, str]
                 ) -> tuple[PreparedBatch | None, list, list, Future, dict[str, float]]:
        """All host work of one batch before the device; then the batch is queued for the device thread.

        The last item is this batch's seconds per prep stage (PREP_STAGES).
        """
        t0 = time.perf_counter()
        images, skipped = {}, []
        for image_id in dict.fromkeys(b.image_id for b in boxes):
            try:
                images[image_id] = self._images.get(paths[image_id])
            except ImageError as e:
                skipped += [(b.id, str(e)) for b in boxes if b.image_id == image_id]
        usable = [b for b in boxes if b.image_id in images]
        on_device: Future = Future()
        t1 = time.perf_counter()
        if not usable:
            return None, skipped, [], on_device, {"read_decode": t1 - t0}
        prepared = prepare_batch(usable, images)
        t2 = time.perf_counter()
        inputs = network_inputs(prepared.crops, self.config.variant, self.config.flip)
        t3 = time.perf_counter()
        self._queue.put((inputs, on_device))
        return prepared, skipped, inputs, on_device, {"read_decode": t1 - t0, "crop": t2 - t1, "input": t3 - t2}

    def run_shard(self, shard: Shard) -> ShardResult:
        cfg = self.config
        started = time.time()
        batches = [shard.boxes[i:i + cfg.batch_size] for i in range(0, len(shard.boxes), cfg.batch_size)]
        futures = [self._prep.submit(self._prepare, b, shard.image_paths) for b in batches]
        result = ShardResult(shard.id, cfg.label, np.zeros(0, np.int64),
                             np.zeros((0, 17, 3), np.float32), np.zeros((0, 4), np.float32), started=started)
        ids, kpts, crop_boxes, dumps, per_call = [], [], [], [], []
        stages = dict.fromkeys(HOST_STAGES, 0.0)
        for future in futures:
            t0 = time.perf_counter()
            prepared, skipped, inputs, on_device, prep_seconds = future.result()
            t1 = time.perf_counter()
            stages["prep_wait"] += t1 - t0
            for stage, s in prep_seconds.items():
                stages[stage] += s
            result.skipped += skipped
            if prepared is None:
                continue
            outputs, seconds, held, call_seconds = on_device.result()
            t2 = time.perf_counter()
            # merge and decode here, while the device thread runs the next batch
            inferred = merge_outputs(cfg.variant, inputs, outputs, seconds)
            t3 = time.perf_counter()
            keypoints = decode_keypoints(inferred.heatmaps, prepared.crop_boxes)
            t4 = time.perf_counter()
            stages["device_wait"] += t2 - t1
            stages["flip_merge"] += t3 - t2
            stages["decode_keypoints"] += t4 - t3
            per_call += call_seconds
            result.busy_seconds += held
            result.device_seconds += inferred.device_seconds
            result.crops += inferred.crops
            result.calls += inferred.calls
            result.bytes_to_device += inferred.bytes_to_device
            result.bytes_from_device += inferred.bytes_from_device
            ids.append(prepared.box_ids)
            kpts.append(keypoints)
            crop_boxes.append(prepared.crop_boxes)
            if cfg.dump_dir:
                dumps.append(inferred.heatmaps)
        if ids:
            result.box_ids, result.keypoints = np.concatenate(ids), np.concatenate(kpts)
            result.crop_boxes = np.concatenate(crop_boxes)
        if cfg.dump_dir and dumps:
            _save_npz(Path(cfg.dump_dir) / f"shard-{shard.id:06d}.npz",
                      box_ids=result.box_ids, heatmaps=np.concatenate(dumps))
        result.call_seconds = np.asarray(per_call, np.float32)
        result.host_seconds = stages
        result.finished = time.time()
        return result

    def close(self) -> None:
        """Close the session on the device thread, then stop it; idempotent."""
        if not self._device_thread.is_alive():
            return
        self._prep.shutdown(wait=False)
        closed = self._submit(self._close_backend)
        self._queue.put(None)
        self._device_thread.join()
        closed.result()


def describe_placement(cfg) -> dict:
    """Where a worker landed: the driver names the device from it and writes OUT/devices.json.

    ``cfg``: a worker config (``WorkerConfig`` or the detector's) with label, kind,
    device, backend and threads. ``visible_devices`` is the visibility variable Ray set
    for this actor (ASCEND_RT_VISIBLE_DEVICES for an NPU slot, CUDA_VISIBLE_DEVICES for
    a GPU): one id per actor when pinning works.
    """
    node_id, node_ip, accelerator_ids = _ray_placement()
    host = socket.gethostname()
    var = VISIBILITY_VARS.get(cfg.kind)
    return {"device": cfg.label, "kind": cfg.kind, "compute_device": cfg.device, "backend": cfg.backend,
            # Simulated nodes share a hostname; the node id prefix tells them apart.
            "node": f"{host}/{node_id[:8]}" if node_id else host, "host": host, "node_ip": node_ip,
            "node_id": node_id, "pid": os.getpid(), "accelerator_ids": accelerator_ids,
            "visible_devices": os.environ.get(var) if var else None, "threads": cfg.threads}


def _ray_placement() -> tuple[str, str, dict[str, list[str]]]:
    """(node id, node IP, accelerator ids by resource) when running in a Ray actor."""
    try:
        import ray
    except ImportError:
        return "", "", {}
    if not ray.is_initialized():  # a plain Worker, outside Ray
        return "", "", {}
    ctx = ray.get_runtime_context()
    ids = {k: list(v) for k, v in ctx.get_accelerator_ids().items() if v}
    return ctx.get_node_id(), ray.util.get_node_ip_address(), ids


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
