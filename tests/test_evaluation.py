"""Records, rescoring, OKS-NMS and the COCOeval wrapper (spec §7–9)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import COCO_MINI, SHARED, requires_shared
from tasks.evaluation import (STAT_NAMES, evaluate_keypoints, oks_nms_indices, rescore, rescore_and_nms,
                              result_record)

REFERENCE = SHARED / "data" / "coco-mini-reference-results" / "keypoint_results.json"


@requires_shared
def test_reference_results_give_pycocotools_numbers():
    stats = evaluate_keypoints(str(COCO_MINI / "annotations" / "person_keypoints_val2017.json"),
                               json.loads(REFERENCE.read_text()))
    expected = [0.860890, 0.993145, 0.910891, 0.775578, 0.937252, 0.875000, 1.000000, 0.916667,
                0.780000, 0.942857]
    assert list(stats) == list(STAT_NAMES)
    assert [round(stats[n], 6) for n in STAT_NAMES] == expected


def test_gt_as_results_scores_one(synthetic_coco):
    ann = json.loads(open(synthetic_coco["ann"]).read())
    results = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
               for a in ann["annotations"]]
    stats = evaluate_keypoints(synthetic_coco["ann"], results)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR"] == pytest.approx(1.0)


def _record(kpts, score, area=1000.0, image_id=1):
    return result_record(image_id, (0, 0, 10, 10), score, np.asarray(kpts, np.float32).reshape(17, 3), area)


def test_record_rounds_like_upstream():
    r = result_record(7, (1.1, 2.2, 3.3, 4.4), 0.123456789, np.zeros((17, 3), np.float32), 12.5)
    assert r["bbox"][0] == float(np.float32(1.1)) and r["score"] == float(np.float32(0.123456789))
    assert list(r) == ["bbox", "image_id", "area", "score", "category_id", "keypoints"]
    assert len(r["keypoints"]) == 51 and r["category_id"] == 1


def test_rescore_mean_of_confident_joints_times_box_score():
    k = np.zeros((17, 3))
    k[:, 2] = 0.1
    k[0, 2], k[1, 2], k[2, 2] = 0.9, 0.3, 0.2  # fl32(0.2) = 0.2000000030 > 0.2: it counts, as upstream
    s = [float(np.float32(v)) for v in (0.9, 0.3, 0.2)]
    assert rescore(_record(k, 0.5)) == (s[0] + s[1] + s[2]) / 3 * float(np.float32(0.5))
    k[:, 2] = 0.19
    assert rescore(_record(k, 0.5)) == 0.0


def test_oks_nms_removes_only_above_threshold():
    base = np.zeros((17, 3))
    base[:, 0] = np.arange(17) * 10
    base[:, 1] = 50
    base[:, 2] = 1
    near = base.copy()
    near[:, 0] += 0.5
    far = base.copy()
    far[:, 0] += 40
    recs = [_record(base, 0.9), _record(near, 0.8), _record(far, 0.7)]
    for r in recs:
        r["score"] = rescore(r)
    assert oks_nms_indices(recs) == [0, 2]


def test_rescore_and_nms_groups_by_image_in_first_appearance_order():
    k = np.zeros((17, 3))
    k[:, 2] = 1
    recs = [_record(k, 0.5, image_id=9), _record(k, 0.9, image_id=3), _record(k + 100, 0.4, image_id=9)]
    out = rescore_and_nms(recs)
    assert [r["image_id"] for r in out] == [9, 9, 3]
    assert recs[0]["score"] == float(np.float32(0.5))  # inputs untouched
