"""Decoded rows -> person boxes in image pixels -> COCO detection records
(docs/numerics.md#detector-nms, docs/numerics.md#detector-records).

Everything is float32 numpy, in upstream's operation order. The two sorts use
``torch.sort`` because upstream's tie order is that of torch's (unstable) sort (D15).
"""
from __future__ import annotations

import numpy as np
import torch

from .spec import DetectorSpec

_ONE = np.float32(1)
_ZERO = np.float32(0)


def _sort_desc(values: np.ndarray) -> np.ndarray:
    return torch.sort(torch.from_numpy(np.ascontiguousarray(values)), descending=True)[1].numpy()


def person_candidates_xyxy(pred: np.ndarray, confidence: float) -> np.ndarray:
    """float32 ``[N, 5+C]`` rows ``(xc, yc, w, h, obj, p..)`` -> ``[k, 5]`` ``(x1, y1, x2, y2, obj)``.

    Keeps rows with ``obj > fl32(confidence)`` whose best class is person (index 0, which
    wins ties) with a nonzero person probability, sorted by obj descending (D2, D3, D4).
    """
    rows = pred[pred[:, 4] > np.float32(confidence)]
    classes = rows[:, 5:]
    person = (classes.argmax(1) == 0) & (classes[:, 0] != 0)
    rows = rows[person]
    xc, yc, w, h, obj = (rows[:, k] for k in range(5))
    half_w, half_h = w / np.float32(2), h / np.float32(2)
    dets = np.stack([xc - half_w, yc - half_h, xc + half_w, yc + half_h, obj], 1).astype(np.float32)
    return dets[_sort_desc(dets[:, 4])]


def _cmax(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # std::max's rule, (a < b) ? b : a, which differs from np.maximum on NaN.
    return np.where(a < b, b, a)


def _cmin(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(b < a, b, a)


def greedy_nms_plus1(dets: np.ndarray, iou: float) -> np.ndarray:
    """Indices (ascending) of the rows of ``dets`` ``[k, 5]`` that greedy NMS keeps.

    Upstream's compiled CPU NMS: ``+1`` widths, suppress when ``IoU >= fl32(iou)``, visit
    by score descending, all in float32 (D5). A visited box suppresses later boxes
    independently of each other, so each step runs vectorised over the rest.
    """
    x1, y1, x2, y2, score = (np.ascontiguousarray(dets[:, k]) for k in range(5))
    areas = (x2 - x1 + _ONE) * (y2 - y1 + _ONE)
    order = _sort_desc(score)
    thr = np.float32(iou)
    suppressed = np.zeros(len(dets), bool)
    with np.errstate(all="ignore"):
        for pos, i in enumerate(order):
            if suppressed[i]:
                continue
            rest = order[pos + 1:]
            rest = rest[~suppressed[rest]]
            iw = _cmax(_ZERO, _cmin(x2[i], x2[rest]) - _cmax(x1[i], x1[rest]) + _ONE)
            ih = _cmax(_ZERO, _cmin(y2[i], y2[rest]) - _cmax(y1[i], y1[rest]) + _ONE)
            inter = iw * ih
            overlap = inter / (areas[i] + areas[rest] - inter)
            suppressed[rest[overlap >= thr]] = True
    return np.flatnonzero(~suppressed)


def person_boxes_letterbox(pred: np.ndarray, spec: DetectorSpec) -> np.ndarray:
    """``[k, 5]`` NMS survivors in letterbox pixels, obj-descending, with the >100 re-run (D6)."""
    dets = person_candidates_xyxy(pred, spec.confidence)
    kept = greedy_nms_plus1(dets, spec.nms_iou)
    if len(kept) > spec.rerun_above:
        # Double arithmetic first, as upstream: 0.6 - 0.05 = 0.5499999999999999.
        kept = greedy_nms_plus1(dets, spec.nms_iou - spec.rerun_step)
    return dets[kept]


def letterbox_xyxy_to_image(dets: np.ndarray, width: int, height: int, inp: int) -> np.ndarray:
    """Map ``x1, y1, x2, y2`` back to image pixels and clamp them to the image.

    Uses a float32 scale ``s`` and the continuous offset ``(inp - s*W) / 2``, not the
    integer placement of the letterbox: upstream's boxes carry that mismatch
    (docs/numerics.md#detector-records; traps D7, D8).
    """
    inp32, w32, h32 = np.float32(inp), np.float32(width), np.float32(height)
    # Upstream writes ``inp / dims`` with a float32 tensor on the right, which torch
    # evaluates as ``dims.reciprocal() * inp``: two roundings, not the one of a division
    # (measured: W = 500 gives 1.2160001, not fl32(608/500) = 1.21599996).
    s = min((_ONE / w32) * inp32, (_ONE / h32) * inp32)
    off_x = (inp32 - s * w32) / np.float32(2)
    off_y = (inp32 - s * h32) / np.float32(2)
    out = dets.copy()
    out[:, [0, 2]] = np.clip((dets[:, [0, 2]] - off_x) / s, _ZERO, w32)
    out[:, [1, 3]] = np.clip((dets[:, [1, 3]] - off_y) / s, _ZERO, h32)
    return out


def coco_person_records(dets: np.ndarray, image_id: int) -> list[dict]:
    """``[k, 5]`` image-pixel ``(x1, y1, x2, y2, obj)`` -> upstream's records, in row order.

    Every number is a float32 value as a Python float, so ``json.dump`` prints its
    exact double (D16); ``w, h`` are float32 differences of the clamped corners.
    """
    wh = dets[:, 2:4] - dets[:, 0:2]
    return [{"category_id": 1, "score": float(d[4]),
             "bbox": [float(d[0]), float(d[1]), float(w), float(h)], "image_id": image_id}
            for d, (w, h) in zip(dets, wh)]
