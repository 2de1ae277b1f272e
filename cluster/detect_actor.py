"""The detector's device worker: a shard of images -> their person records, one image at a time.

``DetectWorker`` is a ``cluster.worker.DeviceWorker``, placed, pinned, warmed up and
closed as the pose ``Worker`` is. It holds no numerics of its own: each image is
read and checked (``tasks.dataset.read_bgr``: a truncated or undecodable file is
refused with its reason, passing read errors are retried), letterboxed, run through
the network on the device thread, and decoded (``tasks.detector``). Two shards run
at once, so one's letterbox and decode overlap the other's network call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from cluster.worker import DeviceWorker, WorkerPlace
from tasks.dataset import ImageError, read_bgr
from tasks.detector import YOLOV3_SPP, image_records, letterbox_bgr_to_rgb_input, open_detector


@dataclass(frozen=True)
class DetectWorkerConfig:
    place: WorkerPlace
    model_path: str  # .weights (torch), .onnx (onnxruntime) or .om, as prepared by the driver
    cfg_path: str  # the Darknet .cfg: the network (torch) and the yolo heads the decode needs


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


class DetectWorker(DeviceWorker):
    def open_session(self, config: DetectWorkerConfig):
        place = config.place
        return open_detector(place.backend, config.model_path, config.cfg_path, place.compute_device, place.threads)

    def warm_up(self, detector, config: DetectWorkerConfig) -> None:
        detector.net_fn(np.zeros((1, 3, YOLOV3_SPP.inp, YOLOV3_SPP.inp), np.float32))

    def _network(self, x: np.ndarray) -> tuple[list, float]:
        """On the device thread: the raw head maps, and the seconds the call held the device."""
        t0 = time.perf_counter()
        raw = self.session.net_fn(x)
        return raw, time.perf_counter() - t0

    def run_shard(self, shard: ImageShard) -> DetectShardResult:
        result = DetectShardResult(shard.id, self.config.place.label, [], started=time.time())
        for path, image_id in shard.images:
            result.images += 1
            try:
                bgr = read_bgr(path)
            except ImageError as e:
                result.unreadable.append({"image_id": image_id, "file": path, "reason": str(e)})
                continue
            x = letterbox_bgr_to_rgb_input(bgr, YOLOV3_SPP.inp)
            raw, busy = self.on_device(partial(self._network, x)).result()
            result.busy_seconds += busy
            result.records += image_records(raw, self.session.heads, image_id, bgr.shape[:2])
        result.finished = time.time()
        return result
