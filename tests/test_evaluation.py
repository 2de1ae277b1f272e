"""Records, rescoring, OKS-NMS and the COCOeval wrapper (spec §7–9)."""
from __future__ import annotations

import builtins
import json
from collections import defaultdict
from importlib import metadata

import numpy as np
import pytest

import reference_evaluation
import tasks.evaluation as evaluation
from conftest import COCO_MINI, COCO_MINI_DETS, SHARED, requires_shared
from reference_evaluation import oks_nms_indices, pose_records, rescore, rescore_and_nms, result_record
from tasks.dataset import Box, load_boxes
from tasks.evaluation import EVALUATORS, STAT_NAMES, EvaluatorError, evaluate_keypoints, evaluator_name, pose_columns
from tasks.transforms import crop_area

REFERENCE = SHARED / "data" / "coco-mini-reference-results" / "keypoint_results.json"
REFERENCE_STATS = [0.860890, 0.993145, 0.910891, 0.775578, 0.937252, 0.875000, 1.000000, 0.916667,
                   0.780000, 0.942857]
COCO_MINI_ANN = COCO_MINI / "annotations" / "person_keypoints_val2017.json"
SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62,
                   1.07, 1.07, .87, .87, .89, .89]) / 10.0


# ---------------------------------------------------------------- COCOeval


@requires_shared
@pytest.mark.parametrize("evaluator", ["pycocotools", "faster-coco-eval"])
def test_reference_results_give_pycocotools_numbers(evaluator):
    pytest.importorskip(evaluator.replace("-", "_"), reason=f"{evaluator} is not installed")
    stats = evaluate_keypoints(str(COCO_MINI_ANN), json.loads(REFERENCE.read_text()), evaluator)
    assert list(stats) == [*STAT_NAMES, "evaluator"]
    assert [round(stats[n], 6) for n in STAT_NAMES] == REFERENCE_STATS
    assert stats["evaluator"] == f"{evaluator} {metadata.version(evaluator)}"


@requires_shared
def test_faster_coco_eval_gives_pycocotools_stats_on_the_reference_results():
    pytest.importorskip("faster_coco_eval", reason="faster-coco-eval is not installed")
    results = json.loads(REFERENCE.read_text())
    fast = evaluate_keypoints(str(COCO_MINI_ANN), results, "faster-coco-eval")
    slow = evaluate_keypoints(str(COCO_MINI_ANN), results, "pycocotools")
    assert max(abs(fast[n] - slow[n]) for n in STAT_NAMES) <= 1e-9
    assert results == json.loads(REFERENCE.read_text())  # loadRes adds fields to copies only


def test_auto_is_faster_coco_eval_when_importable_else_pycocotools(monkeypatch):
    pytest.importorskip("faster_coco_eval", reason="faster-coco-eval is not installed")
    assert evaluator_name("auto") == "faster-coco-eval"
    real_import = builtins.__import__

    def without_faster(name, *args, **kwargs):
        if name.startswith("faster_coco_eval"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_faster)
    assert evaluator_name("auto") == "pycocotools"
    assert evaluator_name("pycocotools") == "pycocotools"
    with pytest.raises(EvaluatorError, match="faster-coco-eval is not installed.*--evaluator pycocotools"):
        evaluator_name("faster-coco-eval")


def test_unknown_evaluator_is_one_line():
    with pytest.raises(EvaluatorError, match=r"evaluator 'coco' is unknown; use one of auto, faster-coco-eval, "
                                             r"pycocotools"):
        evaluate_keypoints("unused.json", [], "coco")
    assert EVALUATORS == ("auto", "faster-coco-eval", "pycocotools")


@pytest.mark.parametrize("evaluator", ["pycocotools", "faster-coco-eval"])
def test_gt_as_results_scores_one(synthetic_coco, evaluator):
    pytest.importorskip(evaluator.replace("-", "_"), reason=f"{evaluator} is not installed")
    ann = json.loads(open(synthetic_coco["ann"]).read())
    results = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
               for a in ann["annotations"]]
    stats = evaluate_keypoints(synthetic_coco["ann"], results, evaluator)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR"] == pytest.approx(1.0)
    assert stats["evaluator"].startswith(evaluator + " ")


def test_no_results_give_zeros_and_name_the_evaluator(synthetic_coco):
    stats = evaluate_keypoints(synthetic_coco["ann"], [], "pycocotools")
    assert [stats[n] for n in STAT_NAMES] == [0.0] * 10
    assert stats["evaluator"] == f"pycocotools {metadata.version('pycocotools')}"


# ---------------------------------------------------------------- records, rescoring, NMS: the rules


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
    assert [r["keypoints"] for r in rescore_and_nms(recs)] == [recs[0]["keypoints"], recs[2]["keypoints"]]


def test_rescore_and_nms_groups_by_image_in_first_appearance_order():
    k = np.zeros((17, 3))
    k[:, 2] = 1
    recs = [_record(k, 0.5, image_id=9), _record(k, 0.9, image_id=3), _record(k + 100, 0.4, image_id=9)]
    out = rescore_and_nms(recs)
    assert [r["image_id"] for r in out] == [9, 9, 3]
    assert recs[0]["score"] == float(np.float32(0.5))  # inputs untouched


# ---------------------------------------------------------------- vectorised == straightforward


def reference_pose_records(boxes, box_ids, keypoints, crop_boxes):
    """The per-record implementation (as it was before vectorising): one result_record per box."""
    by_id = {b.id: b for b in boxes}
    return [result_record(by_id[i].image_id, by_id[i].xywh, by_id[i].score, k, crop_area(c))
            for i, k, c in zip(box_ids.tolist(), keypoints, crop_boxes)]


def reference_rescore_and_nms(records, threshold=0.9):
    """Upstream's oks_pose_nms written out plainly: per image, rescore, argsort, greedy loop."""
    by_image = defaultdict(list)
    for r in records:
        scores = r["keypoints"][2::3]
        confident = [s for s in scores if s > 0.2]
        by_image[r["image_id"]].append(dict(r, score=(sum(confident) / len(confident) if confident else 0.0)
                                            * r["score"]))
    kept = []
    var = (SIGMAS * 2) ** 2
    for group in by_image.values():
        scores = np.array([r["score"] for r in group])
        kpts = np.array([r["keypoints"] for r in group])
        areas = np.array([r["area"] for r in group])
        order = scores.argsort()[::-1]
        while len(order):
            i, rest = order[0], order[1:]
            kept.append(group[i])
            dx = kpts[rest][:, 0::3] - kpts[i][0::3]
            dy = kpts[rest][:, 1::3] - kpts[i][1::3]
            e = (dx ** 2 + dy ** 2) / var / ((areas[i] + areas[rest][:, None]) / 2 + np.spacing(1)) / 2
            oks = np.sum(np.exp(-e), axis=1) / e.shape[1]
            order = rest[oks <= threshold]
    return kept


def random_pose_inputs(seed: int, n_images: int = 60, big_image: int = 0):
    """Boxes and network outputs as a run hands them over, made to hit every NMS branch.

    Near-duplicates with jitter from 0 to a few sigmas (OKS on both sides of 0.9, and
    exactly 1), exact ties in the rescored scores (repeated box and joint scores, and
    20% of rows with no joint > 0.2, so score 0), images out of order, single-box
    images, a few NaN keypoints, and optionally one image of ``big_image`` boxes.
    """
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 2, 3, 8, 20, 45], n_images, p=[.15, .15, .2, .2, .2, .1]).tolist()
    if big_image:
        sizes.append(big_image)
    image_of = np.concatenate([np.full(n, 100 + 7 * g) for g, n in enumerate(sizes)])
    n = len(image_of)
    xy = rng.uniform(0, 600, (n, 2))
    wh = rng.uniform(20, 300, (n, 2))
    kp = np.zeros((n, 17, 3))
    for k in range(n):
        if k and image_of[k] == image_of[k - 1] and rng.random() < 0.6:
            src = rng.integers(max(0, k - 5), k) if image_of[k - 5 if k >= 5 else 0] == image_of[k] else k - 1
            xy[k], wh[k] = xy[src], wh[src]
            jitter = rng.choice([0.0, 0.3, 1.0, 2.0, 4.0, 10.0]) * np.sqrt(wh[k].prod()) / 100
            kp[k, :, :2] = kp[src, :, :2] + rng.normal(0, jitter, (17, 2)) * (rng.random() < 0.9)
        else:
            kp[k, :, :2] = xy[k] + wh[k] * rng.uniform(0, 1, (17, 2))
    kp[:, :, 2] = rng.choice([0.1, 0.3, 0.6, 0.9], (n, 17))
    kp[rng.random(n) < 0.3, :, 2] = rng.uniform(-0.2, 1.0, (17,))
    kp[rng.random(n) < 0.2, :, 2] = 0.15  # no confident joint: rescored 0, all tied
    nan_rows = rng.choice(n, 3, replace=False)
    kp[nan_rows, rng.integers(0, 17, 3), 0] = np.nan
    box_scores = np.where(rng.random(n) < 0.5, rng.choice([0.5, 0.25], n), rng.uniform(0.05, 1.0, n))
    # Box ids as a detection file gives them: gaps where entries were skipped, then shuffled.
    ids = np.sort(rng.choice(3 * n, n, replace=False))
    perm = rng.permutation(n)
    image_of, xy, wh, kp, box_scores, ids = image_of[perm], xy[perm], wh[perm], kp[perm], box_scores[perm], ids[perm]
    boxes = [Box(int(ids[k]), int(image_of[k]), tuple(float(v) for v in (*xy[k], *wh[k])), float(box_scores[k]))
             for k in range(n)]
    order = rng.permutation(n)  # the order results come back from the shards
    crop = np.concatenate([xy - 0.125 * wh, xy + 1.125 * wh], axis=1).astype(np.float32)
    return boxes, ids[order], kp[order].astype(np.float32), crop[order]


def _oks_pair_count(records, low, high):
    """Pairs of one image whose OKS lies in (low, high]: the data really is near the threshold."""
    by_image = defaultdict(list)
    for r in records:
        by_image[r["image_id"]].append(r)
    count = 0
    for group in by_image.values():
        k = np.array([r["keypoints"] for r in group])
        a = np.array([r["area"] for r in group])
        for i in range(len(group)):
            oks = reference_evaluation.oks_one_to_many(k[i], a[i], k[i + 1:], a[i + 1:])
            count += int(((oks > low) & (oks <= high)).sum())
    return count


@pytest.mark.parametrize("seed, big_image, max_batched, chunk", [
    (0, 0, 2048, 1 << 13), (1, 0, 2048, 1 << 13), (2, 300, 2048, 1 << 13),
    (3, 300, 8, 64),  # the per-image fallback for big images, and many small pair blocks
])
def test_vectorised_records_and_nms_match_the_straightforward_code(monkeypatch, seed, big_image, max_batched,
                                                                   chunk):
    monkeypatch.setattr(evaluation, "_MAX_BATCHED", max_batched)
    monkeypatch.setattr(evaluation, "_PAIR_CHUNK", chunk)
    boxes, box_ids, kpts, crops = random_pose_inputs(seed, big_image=big_image)
    expected_records = reference_pose_records(boxes, box_ids, kpts, crops)
    records = pose_records(boxes, box_ids, kpts, crops)
    assert json.dumps(records) == json.dumps(expected_records)
    assert type(records[0]["score"]) is float and type(records[0]["image_id"]) is int
    assert type(records[0]["keypoints"][0]) is float and type(records[0]["bbox"][0]) is float

    expected = reference_rescore_and_nms(expected_records)
    assert json.dumps(rescore_and_nms(records)) == json.dumps(expected)  # same picks, same order, same bits
    assert json.dumps(rescore_and_nms(pose_columns(boxes, box_ids, kpts, crops))) == json.dumps(expected)
    assert json.dumps(records) == json.dumps(expected_records)  # the input is left as it was
    # The data holds what could go wrong: suppressions, survivors near 0.9, and ties at 0.
    assert 0 < len(expected) < len(records)
    assert _oks_pair_count(expected_records, 0.85, 0.9) > 0 and _oks_pair_count(expected_records, 0.9, 0.95) > 0
    assert sum(r["score"] == 0.0 for r in expected) > 10


def test_rescoring_sums_float64_scores_in_joint_order():
    """Records from elsewhere may carry float64 joint scores, where the summation order shows."""
    rng = np.random.default_rng(5)
    records = []
    for k in range(400):
        kp = np.concatenate([rng.uniform(0, 500, (17, 2)), rng.uniform(0, 1, (17, 1))], axis=1)
        records.append({"bbox": [0.0, 0.0, 1.0, 1.0], "image_id": k, "area": 1e4, "score": float(rng.uniform()),
                        "category_id": 1, "keypoints": kp.reshape(-1).tolist()})
    assert json.dumps(rescore_and_nms(records)) == json.dumps(reference_rescore_and_nms(records))
    pairwise = [np.sum([s for s in r["keypoints"][2::3] if s > 0.2]) for r in records]
    sequential = [sum(s for s in r["keypoints"][2::3] if s > 0.2) for r in records]
    assert pairwise != sequential  # the order matters on this data


@requires_shared
def test_vectorised_nms_matches_on_coco_mini_detections():
    """coco-mini's 118 real detections, keypoints from the GT-heatmap double: the same keypoints.json."""
    from fakes.gt_heatmaps import GtHeatmapBackend
    from tasks.dataset import read_rgb
    from tasks.pipeline import keypoints_for_batch, prepare_batch

    box_set = load_boxes(str(COCO_MINI), str(COCO_MINI_DETS))
    assert len(box_set.boxes) == 118
    backend = GtHeatmapBackend(box_set, 16)
    images = {i: read_rgb(p) for i, p in box_set.image_paths.items()}
    batch = prepare_batch(box_set.boxes, images)
    keypoints, _ = keypoints_for_batch(backend, batch)
    expected = reference_rescore_and_nms(reference_pose_records(box_set.boxes, batch.box_ids, keypoints,
                                                                batch.crop_boxes))
    records = pose_records(box_set.boxes, batch.box_ids, keypoints, batch.crop_boxes)
    final = rescore_and_nms(records)
    assert json.dumps(final, indent=1) == json.dumps(expected, indent=1)
    assert 0 < len(final) < 118 and sum(r["score"] == 0.0 for r in final) > 0
