"""The pose stage's device worker: boxes -> crops -> network (normal and mirrored) -> keypoints.

``Worker`` is a ``cluster.worker.DeviceWorker``: its device thread owns the session
and makes the backend calls of ``tasks.pipeline`` back to back. It holds no numerics
of its own: prefetch threads prepare crops and network inputs and queue them for
the device thread; the shard's own thread merges and decodes. It returns keypoints
keyed by box id, never heatmaps unless asked to dump them on its own side.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np

from cluster.worker import DeviceWorker, WorkerPlace
from tasks.backends import open_backend
from tasks.dataset import Box, ImageError, read_rgb
from tasks.decode import decode_keypoints
from tasks.files import atomic_file
from tasks.opencv_check import check_opencv
from tasks.pipeline import PreparedBatch, merge_outputs, network_inputs, prepare_batch, run_network, warm_up
from tasks.variant import Variant


@dataclass(frozen=True)
class WorkerConfig:
    place: WorkerPlace
    model_path: str
    batch_size: int
    prep_threads: int = 1
    flip: bool = True
    dump_dir: str | None = None  # write merged heatmaps here, per shard
    variant: Variant = Variant()  # what the model file computes (tasks.deploy)
    sim_rate: float = 0.0  # network inputs per second, for the sim backend
    allow_opencv_mismatch: bool = False  # crop although OpenCV's warp is not the rule (tasks.opencv_check)


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
    # unix seconds at which each of those calls began (float64: float32 cannot hold a unix time to the ms)
    call_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
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


class Worker(DeviceWorker):
    def __init__(self, config: WorkerConfig) -> None:
        # Before the session opens: a crop by another warp would move every keypoint.
        self.opencv_mismatch = check_opencv(config.allow_opencv_mismatch)
        super().__init__(config)
        self._images = _ImageCache()
        self._prep = ThreadPoolExecutor(max(1, config.prep_threads), thread_name_prefix="prep")

    def describe(self) -> dict:
        import cv2

        return {**super().describe(), "opencv": cv2.__version__, "opencv_warp_mismatch": self.opencv_mismatch}

    def open_session(self, config: WorkerConfig):
        place = config.place
        return open_backend(place.backend, config.model_path, place.compute_device, config.batch_size,
                            place.threads, config.variant, config.sim_rate)

    def warm_up(self, backend, config: WorkerConfig) -> None:
        warm_up(backend, config.flip)

    def set_batch(self, model_path: str, batch_size: int, dump_dir: str | None = None) -> None:
        """Run the next shards at ``batch_size`` (a sweep's next run), dumping heatmaps to ``dump_dir``.

        The backend is reopened only when the model file changes (a static OM is
        built per batch size); a dynamic-batch session (ONNX, torch) is kept. The
        work runs on the device thread; its error is raised here.
        """
        new = replace(self.config, model_path=model_path, batch_size=batch_size, dump_dir=dump_dir)
        self.on_device(partial(self._rebatch, new)).result()

    def _rebatch(self, new: WorkerConfig) -> None:
        """On the device thread."""
        if new.model_path != self.config.model_path or self.session is None:
            self.reopen(new)
            return
        if new.batch_size != self.config.batch_size:
            self.session.batch_size = new.batch_size
            warm_up(self.session, new.flip)
        self.config = new

    def _run_batch(self, inputs: list[np.ndarray]
                   ) -> tuple[list[np.ndarray], float, float, list[float], list[float]]:
        """On the device thread: (outputs, device seconds, seconds busy (holding the device), device seconds of each call,
        unix time each call began)."""
        if self.session is None:
            raise RuntimeError(f"{self.config.place.label}: no open session: the last set_batch failed to open "
                               "its model")
        t0 = time.perf_counter()
        # one run_network per input array, so each call's own device seconds (and start, for the timeline) are kept
        starts, calls = [], []
        for x in inputs:
            starts.append(time.time())
            calls.append(run_network(self.session, [x]))
        busy = time.perf_counter() - t0
        per_call = [s for _, s in calls]
        return [y for ys, _ in calls for y in ys], sum(per_call), busy, per_call, starts

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
        t1 = time.perf_counter()
        if not usable:
            return None, skipped, [], Future(), {"read_decode": t1 - t0}
        prepared = prepare_batch(usable, images)
        t2 = time.perf_counter()
        inputs = network_inputs(prepared.crops, self.config.variant, self.config.flip)
        t3 = time.perf_counter()
        on_device = self.on_device(partial(self._run_batch, inputs))
        return prepared, skipped, inputs, on_device, {"read_decode": t1 - t0, "crop": t2 - t1, "input": t3 - t2}

    def run_shard(self, shard: Shard) -> ShardResult:
        cfg = self.config
        started = time.time()
        batches = [shard.boxes[i:i + cfg.batch_size] for i in range(0, len(shard.boxes), cfg.batch_size)]
        futures = [self._prep.submit(self._prepare, b, shard.image_paths) for b in batches]
        result = ShardResult(shard.id, cfg.place.label, np.zeros(0, np.int64),
                             np.zeros((0, 17, 3), np.float32), np.zeros((0, 4), np.float32), started=started)
        ids, kpts, crop_boxes, dumps, per_call, call_starts = [], [], [], [], [], []
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
            outputs, seconds, busy, call_seconds, starts = on_device.result()
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
            call_starts += starts
            result.busy_seconds += busy
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
        result.call_starts = np.asarray(call_starts, np.float64)
        result.host_seconds = stages
        result.finished = time.time()
        return result

    def close(self) -> None:
        self._prep.shutdown(wait=False)
        super().close()


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_file(path, "wb") as f:
        np.savez(f, **arrays)
