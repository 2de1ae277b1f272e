"""One image -> its person detection records; records -> the detection file
(docs/numerics.md#detector-records).

``net_fn`` is the only backend-specific part: it maps the letterboxed input to the raw
head maps (PyTorch: ``yolo.torch_net_fn``, ONNX Runtime: ``onnx_runtime.onnxruntime_net_fn``).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tasks.dataset import read_bgr
from tasks.files import atomic_file

from .darknet_cfg import Yolo
from .postprocess import coco_person_records, letterbox_xyxy_to_image, person_boxes_letterbox
from .preprocess import letterbox_bgr_to_rgb_input
from .spec import YOLOV3_SPP, DetectorSpec
from .yolo import NetFn, decode_yolo_heads


def detect_image(net_fn: NetFn, image_path: str | Path, image_id: int, heads: Sequence[Yolo],
                 spec: DetectorSpec = YOLOV3_SPP) -> list[dict]:
    """``[{category_id: 1, score, bbox: [x, y, w, h], image_id}, ...]``, obj descending.

    ``heads`` are the cfg's ``[yolo]`` layers (``DarknetCfg.yolo_heads``). Upstream takes
    ``image_id`` from the file name stem; for COCO that is the annotation's id. The
    worker runs the same three steps, the network on its device thread.
    """
    bgr = read_bgr(str(image_path))
    raw = net_fn(letterbox_bgr_to_rgb_input(bgr, spec.inp))
    return image_records(raw, heads, image_id, bgr.shape[:2], spec)


def image_records(raw: Sequence, heads: Sequence[Yolo], image_id: int, image_hw: tuple[int, int],
                  spec: DetectorSpec = YOLOV3_SPP) -> list[dict]:
    """The network's raw head maps of one image -> its person records in image pixels."""
    pred = decode_yolo_heads(raw, heads, spec.inp)
    boxes = person_boxes_letterbox(pred[0].numpy(), spec)
    height, width = image_hw
    return coco_person_records(letterbox_xyxy_to_image(boxes, width, height, spec.inp), image_id)


def coco_image_list(ann_file: str | Path, image_dir: str | Path) -> list[tuple[Path, int]]:
    """``(path, image_id)`` for every image of a COCO annotation file, ascending id (D15)."""
    with open(ann_file) as f:
        images = {im["id"]: im["file_name"] for im in json.load(f)["images"]}
    return [(Path(image_dir) / images[i], i) for i in sorted(images)]


def write_detections(path: str | Path, records: Sequence[dict]) -> None:
    """``json.dump`` of the list, as upstream writes it, replacing ``path`` atomically."""
    with atomic_file(path) as f:
        json.dump(list(records), f)
