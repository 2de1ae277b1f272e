"""The detector's device worker: a shard of images -> their person records, one image at a time.

``DetectWorker`` is a ``cluster.worker.DeviceWorker``, placed, pinned, warmed up and
closed as the pose ``Worker`` is. It holds no numerics of its own, and its host work
runs in its ``cluster.host_work.HostPool`` processes as the pose worker's does
(aclruntime keeps the GIL while the device computes): ``letterbox_into`` reads and
checks an image (``tasks.dataset.read_bgr``: a truncated or undecodable file is
refused with its reason, passing read errors are retried) and writes its letterboxed
input into a shared slot; the device thread runs the network on it and writes the
head maps beside it; ``records_from`` decodes them there (``tasks.detector``). The
device thread starts each step between two network calls, as the pose worker's does;
each image is its own batch, so one image's letterbox and decode overlap another's
network call.
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from cluster.host_work import ArraySpec, HostState, slot_room
from cluster.worker import DeviceWorker, ShardDropped, WorkerPlace
from tasks.dataset import ImageError, read_bgr
from tasks.detector import YOLOV3_SPP, image_records, letterbox_bgr_to_rgb_input, open_detector
from tasks.detector.darknet_cfg import Yolo


@dataclass(frozen=True)
class DetectWorkerConfig:
    place: WorkerPlace
    model_path: str  # .weights (torch), .onnx (onnxruntime) or .om, as prepared by the driver
    cfg_path: str  # the Darknet .cfg: the network (torch) and the yolo heads the decode needs
    host_processes: int = 1  # letterbox and decode processes beside the device (cluster.host_work)


@dataclass
class ImageShard:
    id: int
    images: list[tuple[str, int]]  # (path, image id), ascending id


@dataclass
class DetectShardResult:
    shard_id: int
    device: str
    records: list[dict]  # the shard's images in order, each image's boxes as detect_image gives them
    images: int = 0
    unreadable: list[dict] = field(default_factory=list)  # {image_id, file, reason}: no detections
    busy_seconds: float = 0.0  # holding the device: the network calls
    started: float = 0.0  # unix time
    finished: float = 0.0


@dataclass
class Letterboxed:
    """One image's host work before the device: its input in the slot, or why it could not be read."""

    input: ArraySpec | None
    image_hw: tuple[int, int]
    unreadable: str | None = None


def letterbox_into(state: HostState, slot: int, path: str) -> Letterboxed:
    """Read and check the image, letterbox it into ``slot``: a host process's work."""
    try:
        bgr = read_bgr(path)
    except ImageError as e:
        return Letterboxed(None, (0, 0), str(e))
    (spec,) = state.memory.put(slot, [letterbox_bgr_to_rgb_input(bgr, YOLOV3_SPP.inp)])
    return Letterboxed(spec, bgr.shape[:2])


def records_from(state: HostState, raw: list[ArraySpec], heads: tuple[Yolo, ...], image_id: int,
                 image_hw: tuple[int, int]) -> list[dict]:
    """Decode the head maps the device thread left in the slot: a host process's work."""
    return image_records(state.memory.views(raw), heads, image_id, image_hw)


@dataclass
class _ShardRun:
    """A shard on the device thread: each image's (Letterboxed, busy seconds, records) when back."""

    shard: ImageShard
    done: Future  # -> DetectShardResult
    back: list
    left: int
    started: float = field(default_factory=time.time)


def _numpy(maps) -> list[np.ndarray]:
    """Head maps as numpy arrays on the host (torch gives tensors)."""
    return [m.detach().cpu().numpy() if hasattr(m, "detach") else np.asarray(m) for m in maps]


class DetectWorker(DeviceWorker):
    def __init__(self, config: DetectWorkerConfig) -> None:
        super().__init__(config)
        self.start_host(config.host_processes, self._slot_bytes, name="letterbox")
        self._slots = self.host.slots

    def open_session(self, config: DetectWorkerConfig):
        place = config.place
        return open_detector(place.backend, config.model_path, config.cfg_path, place.compute_device, place.threads)

    def warm_up(self, detector, config: DetectWorkerConfig) -> None:
        x = np.zeros((1, 3, YOLOV3_SPP.inp, YOLOV3_SPP.inp), np.float32)
        # the slots hold an input and the head maps it gives: the warm-up call says how large they are
        self._slot_bytes = slot_room([x.nbytes] + [m.nbytes for m in _numpy(detector.net_fn(x))])

    def run_shard(self, shard: ImageShard) -> DetectShardResult:
        done: Future = Future()
        self.on_device(partial(self._begin, shard, done))
        return done.result()

    def _begin(self, shard: ImageShard, done: Future) -> None:
        """On the device thread: the shard's images queue for slots."""
        run = _ShardRun(shard, done, [None] * len(shard.images), len(shard.images))
        self.begin(done)
        for k, (path, _) in enumerate(shard.images):
            self._slots.when_free(partial(self._letterbox, run, k, path))
        if not shard.images:
            self._image_back(run, -1, None)

    def _letterbox(self, run: _ShardRun, k: int, path: str, slot: int, waited: float) -> None:
        """On the device thread, with a free ``slot``: a host process letterboxes image ``k`` into it."""
        self.prepare_in(run.done, slot, lambda: self.host.least_busy().submit(letterbox_into, slot, path),
                        partial(self._device_step, run, k, slot))

    def _device_step(self, run: _ShardRun, k: int, slot: int, prep: Future) -> None:
        """On the device thread: the network on image ``k`` in ``slot``; its maps go to a host process."""
        try:
            if run.done.done():
                raise ShardDropped
            box: Letterboxed = prep.result()
            if box.input is None:
                self._slots.release(slot)
                self._image_back(run, k, (box, 0.0, None))
                return
            t0 = time.perf_counter()
            raw = _numpy(self.session.net_fn(self._slots.view(box.input)))
            busy = time.perf_counter() - t0
            specs = self._slots.put(slot, raw, after=[box.input])
            records = self.host.least_busy().submit(records_from, specs, self.session.heads, run.shard.images[k][1],
                                                    box.image_hw)
        except BaseException as e:
            self._slots.release(slot)
            self.fail(run.done, e)
            return
        records.add_done_callback(self.then(run.done, partial(self._decoded, run, k, slot, box, busy)))

    def _decoded(self, run: _ShardRun, k: int, slot: int, box: Letterboxed, busy: float, records: Future) -> None:
        self._slots.release(slot)
        self._image_back(run, k, (box, busy, records.result()))

    def _image_back(self, run: _ShardRun, k: int, back: tuple | None) -> None:
        """Image ``k`` is done (-1: an empty shard); the shard's result, in image order, once all are."""
        if k >= 0:
            run.back[k] = back
            run.left -= 1
        if run.left:
            return
        shard = run.shard
        result = DetectShardResult(shard.id, self.config.place.label, [], images=len(shard.images))
        for (path, image_id), (box, busy, records) in zip(shard.images, run.back):
            if records is None:
                result.unreadable.append({"image_id": image_id, "file": path, "reason": box.unreadable})
                continue
            result.busy_seconds += busy
            result.records += records
        result.started, result.finished = run.started, time.time()
        self.end(run.done, result)

