"""coco-analyze's keypoint error classes and AP gains (tasks.keypoint_errors)."""
from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest

from conftest import COCO_MINI, SHARED, requires_shared
from tasks.evaluation import OKS_SIGMAS
from tasks.keypoint_errors import (ERROR_CLASSES, GOOD_KS, KEYPOINT_NAMES, TWIN, analyze_keypoint_errors,
                                   candidate_similarities, classify_joints, diff_analyses,
                                   gt_people_by_image, joint_errors, match_predictions)

REFERENCE_RESULTS = SHARED / "data" / "coco-mini-reference-results" / "keypoint_results.json"
COCO_MINI_GT = COCO_MINI / "annotations" / "person_keypoints_val2017.json"

J = {name: j for j, name in enumerate(KEYPOINT_NAMES)}
AREA = 100.0 ** 2  # scale 100 px


def person(x0: float, y0: float) -> np.ndarray:
    """A standing person's 17 joints, ~60 x 190 px, head at the top: [17, 2]."""
    return np.array([[30, 10], [34, 6], [26, 6], [40, 8], [20, 8], [50, 40], [10, 40], [55, 70], [5, 70],
                     [58, 100], [2, 100], [42, 110], [18, 110], [44, 150], [16, 150], [45, 190], [15, 190]],
                    dtype=np.float64) + [x0, y0]


def gt_ann(ann_id: int, xy: np.ndarray, visible: np.ndarray | None = None, image_id: int = 1) -> dict:
    v = np.full(17, 2) if visible is None else np.where(visible, 2, 0)
    k = np.concatenate([xy, v[:, None]], axis=1)
    k[v == 0, :2] = 0
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "area": AREA,
            "num_keypoints": int((v > 0).sum()), "bbox": [float(xy[:, 0].min()), float(xy[:, 1].min()), 60.0, 190.0],
            "keypoints": k.reshape(-1).tolist()}


def dataset(*anns: dict) -> dict:
    return {"images": [{"id": 1, "width": 640, "height": 480, "file_name": "1.jpg"}],
            "annotations": list(anns),
            "categories": [{"id": 1, "name": "person", "keypoints": list(KEYPOINT_NAMES)}]}


def result(xy: np.ndarray, score: float = 0.9, image_id: int = 1) -> dict:
    k = np.concatenate([xy, np.ones((17, 1))], axis=1)
    return {"image_id": image_id, "category_id": 1, "score": score, "keypoints": k.reshape(-1).tolist()}


def distance_for_ks(ks: float, joint: int, area: float = AREA) -> float:
    """How far from its GT a joint must be to have similarity ``ks``."""
    return float(np.sqrt(-np.log(ks) * 2 * area * (2 * OKS_SIGMAS[joint]) ** 2))


A, B = person(100, 100), person(400, 120)


def one_error_each() -> tuple[dict, list[dict], dict[str, str]]:
    """Person A predicted exactly except one joint per error class; person B exactly."""
    pred = A.copy()
    pred[J["left_wrist"], 0] += distance_for_ks(0.7, J["left_wrist"])    # slightly moved
    pred[J["left_knee"]] = [250.0, 420.0]                                # far from every joint
    pred[J["left_shoulder"]] = A[J["right_shoulder"]]                    # onto its twin
    pred[J["left_ankle"]] = B[J["left_ankle"]]                           # onto another person's same joint
    expected = {name: "good" for name in KEYPOINT_NAMES}
    expected.update(left_wrist="jitter", left_knee="miss", left_shoulder="inversion", left_ankle="swap")
    return dataset(gt_ann(1, A), gt_ann(2, B)), [result(pred, 0.9), result(B, 0.8)], expected


def classes_of(analysed, result_index: int) -> dict[str, str]:
    a = next(a for a in analysed if a.match.result == result_index)
    return {name: ERROR_CLASSES[c] if c >= 0 else "none" for name, c in zip(KEYPOINT_NAMES, a.classes)}


def test_each_hand_made_error_gets_exactly_its_class():
    gt, results, expected = one_error_each()
    analysed = joint_errors(gt, results)
    assert [a.match.gt_id for a in sorted(analysed, key=lambda a: a.match.result)] == [1, 2]
    assert classes_of(analysed, 0) == expected
    assert set(classes_of(analysed, 1).values()) == {"good"}


def test_analysis_json_counts_the_five_classes_per_joint():
    gt, results, expected = one_error_each()
    analysis = analyze_keypoint_errors(gt, results)
    assert list(analysis["joints"]) == list(KEYPOINT_NAMES)
    for name, row in analysis["joints"].items():
        counts = {c: row[c] for c in ERROR_CLASSES}
        assert counts == {c: (1 if c == expected[name] else 0) + (1 if c == "good" else 0) for c in ERROR_CLASSES}
        assert row["keypoints"] == 2
    assert analysis["totals"] == {"good": 30, "jitter": 1, "inversion": 1, "swap": 1, "miss": 1, "keypoints": 34}
    # Median over the two people: exact joints are 0 px away, so the median is half the error.
    moved = distance_for_ks(0.7, J["left_wrist"])
    assert analysis["joints"]["left_wrist"]["median_error_px"] == pytest.approx(moved / 2)
    assert analysis["joints"]["left_wrist"]["median_error_scale"] == pytest.approx(moved / 2 / 100)
    assert analysis["joints"]["nose"]["median_error_px"] == 0.0


def test_jitter_bounds_follow_coco_analyze_thresholds():
    gt = gt_people_by_image(dataset(gt_ann(1, A)))[1][0]
    for ks, expected in ((0.99, "good"), (GOOD_KS + 1e-6, "good"), (0.84, "jitter"), (0.51, "jitter"),
                         (0.49, "miss")):
        pred = A.copy()
        pred[J["right_hip"], 1] += distance_for_ks(ks, J["right_hip"])  # straight down: away from every joint
        classes, best = classify_joints(candidate_similarities(pred, gt, []), gt.visible)
        assert ERROR_CLASSES[classes[J["right_hip"]]] == expected, ks
        assert best[J["right_hip"]] == pytest.approx(ks)


def test_the_best_candidate_decides_as_in_coco_analyze():
    """A joint near its own GT (jitter distance) but nearer its twin is an inversion, not a jitter."""
    xy = A.copy()
    xy[J["right_eye"]] = xy[J["left_eye"]] + [-4.0, 0.0]  # eyes 4 px apart
    gt = gt_people_by_image(dataset(gt_ann(1, xy)))[1][0]
    pred = xy.copy()
    pred[J["left_eye"]] = xy[J["right_eye"]]
    ks = candidate_similarities(pred, gt, [])
    assert 0.5 <= ks[0, J["left_eye"]] < GOOD_KS  # on its own, a jitter
    classes, _ = classify_joints(ks, gt.visible)
    assert ERROR_CLASSES[classes[J["left_eye"]]] == "inversion"


def test_other_people_count_with_the_same_joint_or_its_twin_only():
    """coco-analyze compares joint j with joint j and its twin of each person: a left ankle on
    another person's right ankle is a swap, on their knee a miss."""
    gt = dataset(gt_ann(1, A), gt_ann(2, B))
    people = gt_people_by_image(gt)[1]
    for target, expected in (("right_ankle", "swap"), ("left_knee", "miss")):
        pred = A.copy()
        pred[J["left_ankle"]] = B[J[target]]
        classes, _ = classify_joints(candidate_similarities(pred, people[0], people[1:]), people[0].visible)
        assert ERROR_CLASSES[classes[J["left_ankle"]]] == expected, target


def test_invisible_gt_joints_get_no_class_and_do_not_count():
    visible = np.ones(17, dtype=bool)
    visible[[J["left_ankle"], J["right_ankle"]]] = False
    pred = A.copy()
    pred[J["left_knee"]] = A[J["right_knee"]]  # its twin is visible: an inversion
    pred[J["left_hip"]] = A[J["right_ankle"]]  # where an unannotated joint would be: a miss, not an inversion
    analysis = analyze_keypoint_errors(dataset(gt_ann(1, A, visible)), [result(pred)], with_ap=False)
    joints = analysis["joints"]
    assert joints["left_ankle"]["keypoints"] == 0 and joints["left_ankle"]["median_error_px"] is None
    assert sum(joints["left_ankle"][c] for c in ERROR_CLASSES) == 0
    assert joints["left_knee"]["inversion"] == 1
    assert joints["left_hip"]["miss"] == 1
    assert analysis["totals"]["keypoints"] == 15


def test_a_prediction_far_from_everyone_is_not_matched():
    gt = dataset(gt_ann(1, A))
    results = [result(A, 0.5), result(A + 300, 0.9)]
    matches = match_predictions(gt, results)
    assert [(m.result, m.gt_id) for m in matches] == [(0, 1)]
    assert matches[0].oks == pytest.approx(1.0)


def test_the_higher_score_takes_the_gt_person():
    gt = dataset(gt_ann(1, A))
    near = A + 2.0
    matches = match_predictions(gt, [result(A, 0.3), result(near, 0.6)])
    assert [(m.result, m.gt_id) for m in matches] == [(1, 1)]  # greedy by score, as COCOeval


def test_corrections_land_where_coco_analyze_puts_them():
    gt, results, _ = one_error_each()
    a = next(a for a in joint_errors(gt, results) if a.match.result == 0)
    g = gt_people_by_image(gt)[1][0]
    ks_fixed = np.exp(-np.sum((a.fixed_xy - g.xy) ** 2, axis=1) / (2 * OKS_SIGMAS) ** 2 / AREA / 2)
    # Its shift uses sigma where the similarity uses 2 sigma: ks^(1/4) of the class's threshold.
    assert ks_fixed[J["left_wrist"]] == pytest.approx(0.85 ** 0.25)
    assert ks_fixed[J["left_knee"]] == pytest.approx(0.5 ** 0.25)
    assert ks_fixed[J["left_shoulder"]] == pytest.approx(1.0)  # it had ks 1 with the wrong joint
    assert np.array_equal(a.fixed_xy[J["nose"]], np.asarray(results[0]["keypoints"]).reshape(17, 3)[0, :2])
    classes, _ = classify_joints(candidate_similarities(a.fixed_xy, g, [gt_people_by_image(gt)[1][1]]), g.visible)
    assert {ERROR_CLASSES[c] for c in classes} == {"good", "jitter"}  # a fixed miss lands at ks 0.84


def test_fixing_a_class_gains_ap_and_fixing_none_gains_nothing():
    gt, results, _ = one_error_each()
    analysis = analyze_keypoint_errors(gt, results, evaluator="pycocotools")
    ap = analysis["ap"]
    assert ap["gain"]["miss"] > 0 and ap["gain"]["swap"] > 0 and ap["gain"]["inversion"] > 0
    assert ap["after_fix"]["miss"] == pytest.approx(ap["baseline"] + ap["gain"]["miss"])
    cumulative = list(ap["after_fix_cumulative"].values())
    assert cumulative == sorted(cumulative)
    perfect = analyze_keypoint_errors(gt, [result(A, 0.9), result(B, 0.8)], evaluator="pycocotools")["ap"]
    assert perfect["baseline"] == pytest.approx(1.0)
    assert perfect["gain"] == {c: 0.0 for c in ("miss", "swap", "inversion", "jitter")}


def test_no_results_no_matches_no_gain():
    gt, _, _ = one_error_each()
    analysis = analyze_keypoint_errors(gt, [])
    assert analysis["matched"] == 0 and analysis["totals"]["keypoints"] == 0
    assert analysis["joints"]["nose"]["median_error_px"] is None
    assert analysis["ap"]["baseline"] == 0.0 and analysis["ap"]["gain"]["miss"] == 0.0
    json.dumps(analysis, allow_nan=False)


def test_diff_of_two_analyses_per_joint():
    gt, results, _ = one_error_each()
    a = analyze_keypoint_errors(gt, results, with_ap=False)
    b = analyze_keypoint_errors(gt, [result(A, 0.9), result(B, 0.8)], with_ap=False)
    diff = diff_analyses(a, b)
    assert list(diff["joints"]) == list(KEYPOINT_NAMES)
    assert diff["joints"]["left_knee"]["miss"] == -1 and diff["joints"]["left_knee"]["good"] == 1
    assert diff["joints"]["left_knee"]["miss_fraction"] == pytest.approx(-0.5)
    assert diff["joints"]["nose"] == {**{c: 0 for c in ERROR_CLASSES}, **{f"{c}_fraction": 0.0 for c in ERROR_CLASSES},
                                      "median_error_px": 0.0, "median_error_scale": 0.0}
    assert diff["totals"]["swap"] == -1
    assert diff_analyses(a, a)["totals"] == {c: 0 for c in ERROR_CLASSES}


def test_twins_are_left_right_pairs():
    for j, name in enumerate(KEYPOINT_NAMES):
        twin = KEYPOINT_NAMES[TWIN[j]]
        assert twin == (name.replace("left", "right") if "left" in name else name.replace("right", "left"))


# ---------------------------------------------------------------- coco-mini's reference results


@pytest.fixture(scope="module")
def reference():
    if not SHARED.is_dir():
        pytest.skip("../shared (reference data) is absent: a user's clone has none")
    return json.loads(COCO_MINI_GT.read_text()), json.loads(REFERENCE_RESULTS.read_text())


@requires_shared
def test_matching_is_cocoevals_own(reference):
    """The matches are those pycocotools' evaluateImg makes at OKS 0.1 on coco-analyze's settings."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, results = reference
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(COCO_MINI_GT))
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "keypoints")
        ev.params.areaRng, ev.params.areaRngLbl, ev.params.maxDets, ev.params.iouThrs = \
            [[32 ** 2, 1e5 ** 2]], ["all"], [20], np.array([0.1])
        ev.evaluate()
    expected = {int(d): int(g) for e in ev.evalImgs if e for d, g in zip(e["dtIds"], e["dtMatches"][0]) if g}
    assert {m.result + 1: m.gt_id for m in match_predictions(gt, results)} == expected
    assert len(expected) == 14


@requires_shared
def test_reference_results_analysis(reference):
    """Figures checked against a line-by-line transliteration of coco-analyze's
    ``_find_kpt_errors`` and ``errorsAPImpact`` on pycocotools (not kept in the repo)."""
    gt, results = reference
    kept = copy.deepcopy((gt, results))
    analysis = analyze_keypoint_errors(gt, results, evaluator="pycocotools")
    assert (gt, results) == kept  # nothing of the caller's is changed
    assert (analysis["matched"], analysis["analysed"]) == (14, 12)
    assert analysis["totals"] == {"good": 160, "jitter": 8, "inversion": 3, "swap": 0, "miss": 10, "keypoints": 181}
    assert analysis["joints"]["right_ankle"] == pytest.approx(
        {"good": 8, "jitter": 0, "inversion": 0, "swap": 0, "miss": 2, "keypoints": 10,
         "median_error_px": 4.820283814934384, "median_error_scale": 0.04130941398331913})
    ap = analysis["ap"]
    assert ap["baseline"] == pytest.approx(0.860890, abs=5e-7)  # the README's AP: no small person has keypoints
    assert ap["gain"] == pytest.approx({"miss": 0.06932770200096938, "swap": 0.0,
                                        "inversion": 0.006031987814166029, "jitter": 0.02413922710952432}, abs=1e-12)
    assert list(ap["after_fix_cumulative"].values()) == pytest.approx(
        [0.9302173074450302, 0.9302173074450302, 0.9463546354635465, 0.972007200720072], abs=1e-12)
    json.dumps(analysis, allow_nan=False)


@requires_shared
def test_faster_coco_eval_gives_the_same_gains(reference):
    pytest.importorskip("faster_coco_eval")
    gt, results = reference
    fast = analyze_keypoint_errors(gt, results, evaluator="faster-coco-eval")["ap"]
    slow = analyze_keypoint_errors(gt, results, evaluator="pycocotools")["ap"]
    assert fast["evaluator"].startswith("faster-coco-eval")
    assert fast["baseline"] == pytest.approx(slow["baseline"], abs=1e-9)
    assert fast["gain"] == pytest.approx(slow["gain"], abs=1e-9)
    assert fast["after_fix_cumulative"] == pytest.approx(slow["after_fix_cumulative"], abs=1e-9)
