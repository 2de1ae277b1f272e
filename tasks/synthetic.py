"""A small COCO-style set written by code: images, person boxes with GT keypoints, a detection file.

Used by ``--synthetic N`` (throughput without data or weights) and by the tests,
so that a clone without the reference data still runs the pipeline end to end.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

from tasks.dataset import ANNOTATIONS, IMAGES
from tasks.files import atomic_file, atomic_write_text

KEYPOINT_NAMES = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
                  "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
                  "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"]
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
            [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]
# A standing person facing the camera, as (x, y) fractions of its box; the
# person's left is the image's right.
_POSE = np.array([[.50, .08], [.55, .06], [.45, .06], [.60, .08], [.40, .08], [.68, .22], [.32, .22],
                  [.74, .38], [.26, .38], [.76, .52], [.24, .52], [.60, .55], [.40, .55],
                  [.60, .75], [.40, .75], [.60, .95], [.40, .95]])


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    coarse = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def write_synthetic_coco(root: str | Path, n_boxes: int, seed: int = 0, persons_per_image: int = 4,
                         image_hw: tuple[int, int] = (360, 480), extra_dets_per_image: int = 2) -> dict:
    """Write ``root/val2017``, ``root/annotations`` and ``root/detections/dets.json``.

    ``n_boxes`` GT persons (spread over images of ``persons_per_image``); the
    detection file holds a jittered box for every person, then
    ``extra_dets_per_image`` low-score boxes per image. Returns the paths.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / IMAGES).mkdir(parents=True, exist_ok=True)
    (root / ANNOTATIONS).parent.mkdir(parents=True, exist_ok=True)
    (root / "detections").mkdir(parents=True, exist_ok=True)
    h, w = image_hw
    images, annotations, dets = [], [], []
    n_images = math.ceil(n_boxes / persons_per_image)
    for k in range(n_images):
        image_id = 1000 + k
        name = f"{image_id:012d}.jpg"
        ok, jpeg = cv2.imencode(".jpg", _image(rng, h, w), [cv2.IMWRITE_JPEG_QUALITY, 90])
        # Whole files only: another run sharing the models dir may be reading the set already.
        with atomic_file(root / IMAGES / name, "wb") as f:
            f.write(jpeg.tobytes())
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for _ in range(min(persons_per_image, n_boxes - len(annotations))):
            bh = float(rng.uniform(0.35, 0.9) * h)
            bw = float(bh * rng.uniform(0.35, 0.6))
            x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
            pts = _POSE + rng.normal(0, 0.02, _POSE.shape)
            kx, ky = x + pts[:, 0] * bw, y + pts[:, 1] * bh
            kps = np.stack([kx, ky, np.full(17, 2.0)], axis=1).round(2)
            ann_id = len(annotations) + 1
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
                                "area": round(bw * bh * 0.6, 2), "num_keypoints": 17,
                                "keypoints": kps.reshape(-1).tolist(), "segmentation": []})
            jitter = rng.normal(0, 0.03, 4) * [bw, bh, bw, bh]
            dets.append({"image_id": image_id, "category_id": 1, "score": float(rng.uniform(0.6, 1.0)),
                         "bbox": [x + jitter[0], y + jitter[1], bw + jitter[2], bh + jitter[3]]})
        for _ in range(extra_dets_per_image):
            bw, bh = float(rng.uniform(10, w / 3)), float(rng.uniform(10, h / 3))
            dets.append({"image_id": image_id, "category_id": 1, "score": float(rng.uniform(0.01, 0.2)),
                         "bbox": [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), bw, bh]})
    coco = {"info": {"description": "runner synthetic set", "seed": seed}, "licenses": [],
            "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "person", "supercategory": "person",
                            "keypoints": KEYPOINT_NAMES, "skeleton": SKELETON}]}
    atomic_write_text(root / ANNOTATIONS, json.dumps(coco))
    atomic_write_text(root / "detections" / "dets.json", json.dumps(dets))  # last: the set is whole
    return {"dataroot": str(root), "ann": str(root / ANNOTATIONS), "dets": str(root / "detections" / "dets.json")}
