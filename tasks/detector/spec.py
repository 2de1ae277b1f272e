"""The constants upstream's YOLO person detector runs with (docs/numerics.md#letterbox,
docs/numerics.md#detector-nms)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DetectorSpec:
    #: Square network input; also replaces the cfg's ``[net] height``.
    inp: int = 608
    #: ``obj > confidence`` in float32 (``detector/yolo_cfg.py``; not the YAML's 0.05, D4).
    confidence: float = 0.1
    #: Greedy NMS IoU threshold, suppressing at ``>=`` (D5).
    nms_iou: float = 0.6
    #: More than this many boxes after NMS re-runs it at ``nms_iou - rerun_step`` (D6).
    rerun_above: int = 100
    rerun_step: float = 0.05


YOLOV3_SPP = DetectorSpec()
