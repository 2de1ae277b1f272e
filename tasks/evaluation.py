"""Result records, rescoring, OKS-NMS and COCOeval (spec §7–9).

``results`` are COCO keypoint result dicts. ``keypoints.json`` holds exactly the
list that ``evaluate_keypoints`` is given.
"""
from __future__ import annotations

import contextlib
import copy
import io
from collections import defaultdict

import numpy as np

from tasks.dataset import Box
from tasks.transforms import crop_area

#: COCO keypoint sigmas, also used by OKS-NMS (spec §8).
OKS_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62,
                       1.07, 1.07, .87, .87, .89, .89]) / 10.0
RESCORE_THRESHOLD = 0.2
NMS_THRESHOLD = 0.9
STAT_NAMES = ("AP", "AP .5", "AP .75", "AP (M)", "AP (L)",
              "AR", "AR .5", "AR .75", "AR (M)", "AR (L)")


def result_record(image_id: int, xywh: tuple[float, ...], score: float,
                  keypoints: np.ndarray, area: float) -> dict:
    """One pose result before NMS, with upstream's fields and float32 roundings (spec §7).

    ``keypoints``: float32 ``[17, 3]``; ``area``: of the crop box, used by OKS-NMS only.
    """
    return {
        "bbox": [float(v) for v in np.asarray(xywh, dtype=np.float32)],
        "image_id": int(image_id),
        "area": float(area),
        "score": float(np.float32(score)),
        "category_id": 1,
        "keypoints": [float(v) for v in np.asarray(keypoints, dtype=np.float32).reshape(-1)],
    }


def pose_records(boxes: list[Box], box_ids: np.ndarray, keypoints: np.ndarray,
                 crop_boxes: np.ndarray) -> list[dict]:
    """Result records (before NMS) for computed boxes, in the order of ``box_ids``."""
    by_id = {b.id: b for b in boxes}
    return [result_record(by_id[i].image_id, by_id[i].xywh, by_id[i].score, k, crop_area(c))
            for i, k, c in zip(box_ids.tolist(), keypoints, crop_boxes)]


def rescore(record: dict) -> float:
    """Box score times the mean of the keypoint scores > 0.2 (0 if none), trap T11."""
    scores = record["keypoints"][2::3]
    confident = [s for s in scores if s > RESCORE_THRESHOLD]
    kpt_score = sum(confident) / len(confident) if confident else 0.0
    return kpt_score * record["score"]


def oks_one_to_many(kpts: np.ndarray, area: float, others: np.ndarray, other_areas: np.ndarray) -> np.ndarray:
    """OKS of one result against several, over all 17 joints (no visibility filter)."""
    var = (OKS_SIGMAS * 2) ** 2
    dx = others[:, 0::3] - kpts[0::3]
    dy = others[:, 1::3] - kpts[1::3]
    # Same operation order as upstream: the 0.9 threshold is compared exactly.
    e = (dx ** 2 + dy ** 2) / var / ((area + other_areas[:, None]) / 2 + np.spacing(1)) / 2
    return np.sum(np.exp(-e), axis=1) / e.shape[1]


def oks_nms_indices(records: list[dict], threshold: float = NMS_THRESHOLD) -> list[int]:
    """Greedy OKS-NMS over one image's results; indices kept, in pick order."""
    scores = np.array([r["score"] for r in records])
    kpts = np.array([r["keypoints"] for r in records])
    areas = np.array([r["area"] for r in records])
    # Same sort call as upstream: ties (many score-0 results) fall the same way (trap T12).
    order = scores.argsort()[::-1]
    keep = []
    while len(order) > 0:
        i = order[0]
        keep.append(int(i))
        oks = oks_one_to_many(kpts[i], areas[i], kpts[order[1:]], areas[order[1:]])
        order = order[np.where(oks <= threshold)[0] + 1]
    return keep


def rescore_and_nms(records: list[dict]) -> list[dict]:
    """Per image (in order of first appearance): rescore, then OKS-NMS (spec §8).

    Returns new dicts; the input records are not changed.
    """
    by_image: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by_image[r["image_id"]].append(dict(r, score=rescore(r)))
    kept: list[dict] = []
    for group in by_image.values():
        kept += [group[i] for i in oks_nms_indices(group)]
    return kept


def evaluate_keypoints(ann_file: str, results: list[dict]) -> dict[str, float]:
    """pycocotools COCOeval 'keypoints' with default params; the 10 stats by name.

    Evaluates over every image of the annotation file. pycocotools prints its
    progress; that is captured, not shown.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        # loadRes adds id, area and bbox to the dicts it is given: give it a copy.
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, "keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
