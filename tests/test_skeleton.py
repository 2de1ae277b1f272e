"""Skeleton drawings and the choice of the worst people (tasks.skeleton)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from conftest import COCO_MINI, SHARED, requires_shared
from tasks.skeleton import (GT_COLOUR, PRED_CENTRE, PRED_LEFT, PRED_RIGHT, SKELETON, draw_skeleton, gallery,
                            index_poses, limb_colour, render, show_images, worst_images, worst_persons)
from test_keypoint_errors import A, B, dataset, gt_ann, result

GREY = 90
REFERENCE_RESULTS = SHARED / "data" / "coco-mini-reference-results" / "keypoint_results.json"


def blank(h: int = 480, w: int = 640) -> np.ndarray:
    return np.full((h, w, 3), GREY, dtype=np.uint8)


def keypoints(xy: np.ndarray, score: float = 1.0) -> np.ndarray:
    return np.concatenate([xy, np.full((len(xy), 1), score)], axis=1)


def midpoint(k: np.ndarray, a: int, b: int) -> tuple[int, int]:
    x, y = np.round((k[a, :2] + k[b, :2]) / 2).astype(int)
    return int(y), int(x)


def test_a_limb_is_drawn_in_its_side_colour_in_bgr_and_rgb():
    k = keypoints(A)
    bgr = render(blank(), [k], channels="bgr", thickness=5)
    rgb = render(blank(), [k], channels="rgb", thickness=5)
    left_arm, right_arm, hips = midpoint(k, 5, 7), midpoint(k, 6, 8), midpoint(k, 11, 12)
    assert tuple(bgr[left_arm]) == PRED_LEFT[::-1]
    assert tuple(rgb[left_arm]) == PRED_LEFT
    assert tuple(rgb[right_arm]) == PRED_RIGHT
    assert tuple(rgb[hips]) == PRED_CENTRE
    assert tuple(rgb[10, 600]) == (GREY, GREY, GREY)  # far from the person: untouched
    assert limb_colour(5, 7) == PRED_LEFT and limb_colour(12, 14) == PRED_RIGHT and limb_colour(5, 6) == PRED_CENTRE


def test_gt_is_drawn_lighter_below_the_prediction():
    shifted = A + [200.0, 0.0]
    out = render(blank(), [keypoints(shifted)], [keypoints(A, 2.0)], channels="rgb", thickness=6)
    gt_arm = midpoint(keypoints(A), 5, 7)
    assert tuple(out[gt_arm]) == GT_COLOUR
    assert sum(GT_COLOUR) > sum(PRED_LEFT) + 100  # lighter than any prediction colour
    both = render(blank(), [keypoints(A)], [keypoints(A, 2.0)], channels="rgb", thickness=6)
    assert tuple(both[gt_arm]) == PRED_LEFT  # the prediction stays on top


def test_low_confidence_joints_and_invisible_gt_joints_are_not_drawn():
    k = keypoints(A)
    k[7, 2] = 0.01  # left elbow barely seen: neither its limbs nor itself
    out = render(blank(), [k], channels="rgb", thickness=5)
    assert tuple(out[midpoint(k, 7, 9)]) == (GREY, GREY, GREY)
    assert tuple(out[midpoint(k, 8, 10)]) == PRED_RIGHT
    g = keypoints(A, 2.0)
    g[7, 2] = 0
    out = render(blank(), [], [g], channels="rgb", thickness=6)
    assert tuple(out[midpoint(g, 7, 9)]) == (GREY, GREY, GREY)
    assert tuple(out[midpoint(g, 8, 10)]) == GT_COLOUR


def test_drawing_is_in_place_and_render_copies():
    image = blank()
    out = render(image, [keypoints(A)])
    assert (image == GREY).all() and not (out == GREY).all()
    assert draw_skeleton(image, keypoints(A)) is image and not (image == GREY).all()


def test_worst_people_first_with_gt():
    gt = dataset(gt_ann(1, A), gt_ann(2, B), gt_ann(3, A, image_id=2))  # image 2: nobody predicted
    gt["images"].append({"id": 2, "width": 640, "height": 480, "file_name": "2.jpg"})
    poor = A.copy()
    poor[5:11] += 25.0  # arms off
    poses = index_poses([result(poor, 0.9), result(B, 0.8)], gt)
    views = worst_persons(poses)
    assert [v.gt_id for v in views] == [3, 1, 2]
    assert views[0].quality == 0.0 and views[0].result is None and views[0].image_id == 2
    assert worst_images(poses) == [2, 1]
    assert 0.3 < views[1].quality < 0.9 and views[1].result == 0
    assert views[2].quality == pytest.approx(1.0)
    assert views[1].caption == f"image 1 · GT 1 · oks {views[1].quality:.3f}"


def test_worst_without_gt_is_lowest_score_above_the_floor():
    results = [result(A, 0.9), result(B, 0.5), result(A, 0.05, image_id=2), result(B, 0.3, image_id=2)]
    poses = index_poses(results)
    assert [v.result for v in worst_persons(poses)] == [3, 1, 0]  # 0.05 is below the floor: not a person
    assert worst_images(poses) == [2, 1]
    assert worst_images(poses, n=1) == [2]


@pytest.fixture(scope="module")
def coco_mini():
    if not SHARED.is_dir():
        pytest.skip("../shared (reference data) is absent: a user's clone has none")
    gt = json.loads((COCO_MINI / "annotations" / "person_keypoints_val2017.json").read_text())
    results = json.loads(REFERENCE_RESULTS.read_text())
    paths = {int(p.stem): str(p) for p in (COCO_MINI / "val2017").glob("*.jpg")}
    return gt, results, paths


def limb_midpoints_in_colour(image_rgb: np.ndarray, k: np.ndarray) -> int:
    """How many of a person's limbs show their prediction colour at their midpoint."""
    return sum(tuple(image_rgb[midpoint(k, a, b)]) == limb_colour(a, b) for a, b in SKELETON
               if k[a, 2] >= 0.05 and k[b, 2] >= 0.05)


@requires_shared
def test_show_draws_real_skeletons_on_the_worst_images(coco_mini, tmp_path):
    gt, results, paths = coco_mini
    written = show_images(paths, results, tmp_path, gt, n=2)
    assert [p.name for p in written] == ["000000197388.png", "000000040083.png"]  # its people scored lowest
    drawn = cv2.cvtColor(cv2.imread(str(written[0])), cv2.COLOR_BGR2RGB)
    original = cv2.cvtColor(cv2.imread(paths[197388]), cv2.COLOR_BGR2RGB)
    assert drawn.shape == original.shape
    best = max((r for r in results if r["image_id"] == 197388), key=lambda r: r["score"])
    k = np.asarray(best["keypoints"]).reshape(17, 3)
    assert limb_midpoints_in_colour(drawn, k) >= 12
    assert limb_midpoints_in_colour(original, k) == 0
    chosen = show_images(paths, results, tmp_path / "chosen", gt, image_ids=[785])
    assert [p.name for p in chosen] == ["000000000785.png"]
    with pytest.raises(KeyError):
        show_images(paths, results, tmp_path, gt, image_ids=[1])


@requires_shared
def test_gallery_of_coco_mini_worst_first(coco_mini):
    gt, results, paths = coco_mini
    items = gallery(paths, results, gt, n=12)
    assert len(items) == 12  # people, not images: 4 images give 12 annotated people
    assert items[0][0] == "image 197388 · GT 467657 · oks 0.556"
    oks = [float(caption.rsplit(" ", 1)[1]) for caption, _ in items]
    assert oks == sorted(oks)
    for _, png in items:
        image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and max(image.shape[:2]) == 320
        # Drawn, not a plain crop: the prediction colours are there.
        colours = {tuple(c) for c in image.reshape(-1, 3)[:, ::-1].tolist()}
        assert PRED_LEFT in colours and PRED_RIGHT in colours
