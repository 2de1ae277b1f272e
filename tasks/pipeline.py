"""The path of a batch of boxes: image -> crop -> network (normal and mirrored) -> keypoints.

Per-box work is a pure function of (image, box), so it runs the same in one
process or in any number of device actors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.backends.base import Backend
from tasks.dataset import Box
from tasks.decode import decode_keypoints, flip_merge
from tasks.transforms import (box_xywh_to_center_scale, center_scale_to_crop_box, crop_rgb,
                              crops_to_input, flip_input)


def crop_for_box(image_rgb: np.ndarray, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``[256, 192, 3]`` crop and its float32 crop box ``[x1, y1, x2, y2]``."""
    center, scale = box_xywh_to_center_scale(box.xywh)
    return crop_rgb(image_rgb, center, scale), center_scale_to_crop_box(center, scale)


@dataclass
class PreparedBatch:
    box_ids: np.ndarray  # int64 [n]
    crops: np.ndarray  # uint8 [n, 256, 192, 3]
    crop_boxes: np.ndarray  # float32 [n, 4]


def prepare_batch(boxes: list[Box], images: dict[int, np.ndarray]) -> PreparedBatch:
    """Crops of ``boxes``; ``images`` maps image id -> RGB image for every box."""
    pairs = [crop_for_box(images[b.image_id], b) for b in boxes]
    return PreparedBatch(np.array([b.id for b in boxes], dtype=np.int64),
                         np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))


@dataclass
class InferredBatch:
    heatmaps: np.ndarray  # float32 [n, 17, 64, 48], flip-merged
    device_seconds: float
    calls: int  # backend calls made
    crops: int  # network inputs computed (2 per box with flip test)


def infer_flip_test(backend: Backend, crops: np.ndarray, flip: bool = True) -> InferredBatch:
    """Run the network on the crops and, with ``flip``, on their mirror; merge (spec §4)."""
    x = crops_to_input(crops)
    heatmaps, seconds = backend.run(x)
    if not flip:
        return InferredBatch(heatmaps, seconds, 1, len(x))
    flipped, seconds_flipped = backend.run(flip_input(x))
    return InferredBatch(flip_merge(heatmaps, flipped), seconds + seconds_flipped, 2, 2 * len(x))


def keypoints_for_batch(backend: Backend, batch: PreparedBatch, flip: bool = True
                        ) -> tuple[np.ndarray, InferredBatch]:
    """float32 ``[n, 17, 3]`` keypoints (x, y, score in image pixels) and the inference record."""
    inferred = infer_flip_test(backend, batch.crops, flip)
    return decode_keypoints(inferred.heatmaps, batch.crop_boxes), inferred
