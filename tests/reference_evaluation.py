"""The plain, per-record forms of tasks/evaluation.py's numerics, as upstream writes them.

The product computes records, rescoring and OKS-NMS on columns (``pose_columns``,
``nms_rows``); these are the reference they are held to (tests/test_evaluation.py),
and the dict-based pipeline the end-to-end tests compare a run with.
"""
from __future__ import annotations

import numpy as np

from tasks.dataset import Box
from tasks.evaluation import NMS_THRESHOLD, OKS_SIGMAS, RESCORE_THRESHOLD, PoseColumns, _gc_paused, nms_rows, pose_columns


def result_record(image_id: int, xywh: tuple[float, ...], score: float,
                  keypoints: np.ndarray, area: float) -> dict:
    """One pose result before NMS, with upstream's fields and float32 roundings (docs/numerics.md#records).

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
    return pose_columns(boxes, box_ids, keypoints, crop_boxes).records()


def rescore(record: dict) -> float:
    """Box score times the mean of the keypoint scores > 0.2 (0 if none): docs/numerics.md#rescoring, trap T11."""
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


def rescore_and_nms(records: list[dict] | PoseColumns) -> list[dict]:
    """Per image (in order of first appearance): rescore, then OKS-NMS (docs/numerics.md#oks-nms).

    Takes result dicts (``pose_records``) or their columns (``pose_columns``, which skips
    building the dicts that NMS drops). Returns new dicts; the input is not changed.
    """
    if isinstance(records, PoseColumns):
        rows, scores = nms_rows(records.image_ids, records.scores, records.keypoints, records.areas)
        return records.records(rows, scores)
    n = len(records)
    with _gc_paused():
        columns = (np.array([r["image_id"] for r in records]).reshape(n),
                   np.array([r["score"] for r in records], dtype=np.float64).reshape(n),
                   np.array([r["keypoints"] for r in records], dtype=np.float64).reshape(n, len(OKS_SIGMAS), 3),
                   np.array([r["area"] for r in records], dtype=np.float64).reshape(n))
    rows, scores = nms_rows(*columns)
    with _gc_paused():
        return [dict(records[i], score=s) for i, s in zip(rows.tolist(), scores.tolist())]
