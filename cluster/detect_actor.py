"""The detector's per-device worker: one process, one device, one detector session.

``DetectWorker`` is a plain class; the driver (``runner.detect``) turns it into a Ray
actor with the same placement, resources and visibility pinning as the pose
``Worker`` (``cluster.pool.ActorPool``). It holds no numerics of its own: each
image of a shard goes through ``tasks.detector.detect_image`` and the records come
back in the shard's image order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from cluster.actor import describe_placement
from tasks.detector import ImageError, detect_image, open_detector


@dataclass(frozen=True)
class DetectWorkerConfig:
    backend: str  # torch | onnxruntime | om
    model_path: str  # .weights (torch), .onnx (onnxruntime) or .om, as prepared by the driver
    cfg_path: str  # the Darknet .cfg: the network (torch) and the yolo heads the decode needs
    device: str  # what the backend opens, as this process sees it: 'cpu', 'cuda:0', 'npu:0'
    label: str  # provisional; the driver names the device once Ray has placed the actor
    kind: str  # the slot the actor holds: 'cpu' | 'cuda' | 'npu'
    threads: int


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
    unreadable: list[tuple[int, str]] = field(default_factory=list)  # (image id, reason)
    busy_seconds: float = 0.0  # decode, letterbox, network, post-processing
    started: float = 0.0  # unix time
    finished: float = 0.0


class DetectWorker:
    def __init__(self, config: DetectWorkerConfig) -> None:
        self.config = config
        self.detector = open_detector(config.backend, config.model_path, config.cfg_path, config.device,
                                      config.threads)

    def describe(self) -> dict:
        """Where this worker landed, in the pose ``Worker``'s terms (the driver names devices from it)."""
        return describe_placement(self.config)

    def run_shard(self, shard: ImageShard) -> DetectShardResult:
        result = DetectShardResult(shard.id, self.config.label, [], started=time.time())
        for path, image_id in shard.images:
            t0 = time.perf_counter()
            try:
                result.records += detect_image(self.detector.net_fn, path, image_id, self.detector.heads)
            except ImageError as e:
                result.unreadable.append((image_id, str(e)))
            result.busy_seconds += time.perf_counter() - t0
            result.images += 1
        result.finished = time.time()
        return result

    def close(self) -> None:
        self.detector.close()
