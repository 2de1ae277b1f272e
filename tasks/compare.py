"""Two COCO keypoint result lists compared box by box: how far apart two runs' keypoints are.

Pure numpy, no files: ``runner report A B`` compares two runs' ``keypoints.json`` with it,
and a parity check (another backend on the same boxes) can give it its two lists.

Matching: a result is keyed by ``(image_id, bbox)``. The bbox is the detection box the
result was computed from, copied unchanged from the box file, so two runs of the same
box file give bit-identical keys whatever their keypoints. A key held by several results
(a box file with duplicate boxes) pairs them in list order: both runs write results in the
same order. Results whose key the other list lacks (OKS-NMS kept a different set) are
counted as unmatched and compared with nothing.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from tasks.evaluation import OKS_SIGMAS

#: The tolerances of the two ``frac_within`` figures, in pixels (on max(|dx|, |dy|) of a joint).
TIGHT_PX = 1e-3
LOOSE_PX = 0.5


@dataclass
class KeypointComparison:
    matched: int  # result pairs compared
    unmatched_a: int  # results of the first list with no partner in the second
    unmatched_b: int
    max_abs_px: float | None  # over x and y of every joint of every pair; None when nothing matched
    frac_within_tight: float | None  # joints whose max(|dx|, |dy|) <= TIGHT_PX
    frac_within_loose: float | None  # ... <= LOOSE_PX
    max_abs_score: float | None  # |score_a - score_b| of the results' (rescored) score
    max_abs_joint_score: float | None  # |a - b| of the 17 per-joint confidences
    mean_oks: float | None  # mean over pairs of the GT-free OKS (see ``oks``)

    def as_dict(self) -> dict:
        """The figures under the names ``parity.json`` and the report's comparison JSON use."""
        return {"matched": self.matched, "unmatched_a": self.unmatched_a, "unmatched_b": self.unmatched_b,
                "max_abs_px": self.max_abs_px, "frac_within_1e-3px": self.frac_within_tight,
                "frac_within_0.5px": self.frac_within_loose, "max_abs_score": self.max_abs_score,
                "max_abs_joint_score": self.max_abs_joint_score, "mean_oks": self.mean_oks}


def match_results(a: list[dict], b: list[dict]) -> tuple[list[tuple[int, int]], int, int]:
    """Index pairs (i into a, j into b) with the same (image_id, bbox); and the unmatched counts."""
    slots: dict[tuple, list[int]] = defaultdict(list)
    for j, r in enumerate(b):
        slots[_key(r)].append(j)
    taken = defaultdict(int)  # how many of a key's b results are paired already
    pairs = []
    for i, r in enumerate(a):
        key = _key(r)
        k = taken[key]
        if k < len(slots.get(key, ())):
            pairs.append((i, slots[key][k]))
            taken[key] = k + 1
    return pairs, len(a) - len(pairs), len(b) - len(pairs)


def _key(result: dict) -> tuple:
    return int(result["image_id"]), tuple(float(v) for v in result["bbox"])


def oks(kpts_a: np.ndarray, kpts_b: np.ndarray, area: np.ndarray) -> np.ndarray:
    """COCO's object keypoint similarity of each pair, GT-free: [n] from [n, 17, 2] and [n].

    COCOeval's formula (e = d^2 / (2 * area * (2 sigma)^2), OKS = mean of exp(-e)) with the
    first list standing in for the ground truth: every one of the 17 joints counts (a
    prediction has no visibility flags) and ``area`` is the first result's bbox w * h
    (COCOeval takes the annotation's segment area, which a result does not have; the box
    area is larger, so this OKS is a little more lenient than COCOeval's).
    """
    var = (OKS_SIGMAS * 2) ** 2
    d2 = ((kpts_a - kpts_b) ** 2).sum(axis=-1)
    e = d2 / var / (area[:, None] + np.spacing(1)) / 2
    return np.exp(-e).mean(axis=-1)


def compare_results(a: list[dict], b: list[dict]) -> KeypointComparison:
    """Results ``b`` against ``a`` (both COCO keypoint result lists), box by box."""
    pairs, lone_a, lone_b = match_results(a, b)
    if not pairs:
        return KeypointComparison(0, lone_a, lone_b, None, None, None, None, None, None)
    ka = _keypoints([a[i] for i, _ in pairs])
    kb = _keypoints([b[j] for _, j in pairs])
    dxy = np.abs(ka[..., :2] - kb[..., :2])  # [n, 17, 2]
    per_joint = dxy.max(axis=-1)  # max(|dx|, |dy|) of each joint
    scores = np.abs(np.array([a[i]["score"] for i, _ in pairs], np.float64)
                    - np.array([b[j]["score"] for _, j in pairs], np.float64))
    area = np.array([a[i]["bbox"][2] * a[i]["bbox"][3] for i, _ in pairs], np.float64)
    return KeypointComparison(
        matched=len(pairs), unmatched_a=lone_a, unmatched_b=lone_b,
        max_abs_px=float(dxy.max()),
        frac_within_tight=float((per_joint <= TIGHT_PX).mean()),
        frac_within_loose=float((per_joint <= LOOSE_PX).mean()),
        max_abs_score=float(scores.max()),
        max_abs_joint_score=float(np.abs(ka[..., 2] - kb[..., 2]).max()),
        mean_oks=float(oks(ka[..., :2], kb[..., :2], area).mean()))


def _keypoints(results: list[dict]) -> np.ndarray:
    """float64 [n, 17, 3]: the figures as the JSON holds them, compared without rounding."""
    return np.array([r["keypoints"] for r in results], np.float64).reshape(len(results), len(OKS_SIGMAS), 3)
