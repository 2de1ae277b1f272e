"""tasks.compare on result lists built with known offsets: every figure exactly as expected.

Offsets and coordinates are dyadic (sums of powers of two), so every difference is exact in
float64 and the figures can be asserted with ==.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from tasks.compare import compare_results, match_results, oks

SIGMAS = [.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]


def result(image_id: int, bbox: list[float], seed: int, score: float = 0.5) -> dict:
    rng = np.random.default_rng(seed)
    xy = rng.integers(0, 400, (17, 2)) + 0.25  # dyadic: differences below are exact
    conf = rng.integers(1, 8, 17) / 8
    kpts = np.concatenate([xy, conf[:, None]], axis=1).ravel().tolist()
    return {"image_id": image_id, "category_id": 1, "bbox": bbox, "score": score, "keypoints": kpts}


def shift(r: dict, joint: int, axis: int, by: float) -> None:
    r["keypoints"][joint * 3 + axis] += by


def lists() -> tuple[list[dict], list[dict]]:
    a = [result(1, [10.5, 20.25, 64.0, 128.0], 0), result(1, [100.0, 50.0, 32.0, 96.0], 1),
         result(2, [0.0, 0.0, 200.0, 100.0], 2), result(3, [5.0, 5.0, 10.0, 10.0], 3)]
    b = copy.deepcopy(a[:3]) + [result(4, [1.0, 1.0, 2.0, 2.0], 4)]  # a[3] and b[3] have no partner
    b = [b[2], b[0], b[3], b[1]]  # order does not matter to the matching
    first, second = b[1], b[3]
    for j in range(17):
        shift(first, j, 0, 2 ** -11)  # 0.00049 px: within 1e-3 px
    shift(second, 3, 1, -0.25)  # within 0.5 px, not 1e-3
    shift(second, 5, 0, 2.0)  # beyond both
    second["score"] = 0.625
    second["keypoints"][7 * 3 + 2] += 0.25  # one joint confidence
    return a, b


def expected_oks(a: dict, b: dict) -> float:
    """COCOeval's per-joint formula, written out joint by joint, with a's bbox area."""
    area = a["bbox"][2] * a["bbox"][3]
    total = 0.0
    for k, s in enumerate(SIGMAS):
        dx = a["keypoints"][3 * k] - b["keypoints"][3 * k]
        dy = a["keypoints"][3 * k + 1] - b["keypoints"][3 * k + 1]
        var = (2 * s / 10) ** 2
        total += math.exp(-(dx * dx + dy * dy) / var / (area + np.spacing(1)) / 2)
    return total / 17


def test_known_offsets_give_the_exact_figures():
    a, b = lists()
    got = compare_results(a, b).as_dict()
    assert got["matched"] == 3 and got["unmatched_a"] == 1 and got["unmatched_b"] == 1
    assert got["max_abs_px"] == 2.0
    assert got["frac_within_1e-3px"] == 49 / 51  # 3 pairs x 17 joints; two beyond 1e-3 px
    assert got["frac_within_0.5px"] == 50 / 51  # only the 2 px joint beyond 0.5 px
    assert got["max_abs_score"] == 0.125
    assert got["max_abs_joint_score"] == 0.25
    pairs = [(a[0], b[1]), (a[1], b[3]), (a[2], b[0])]
    assert got["mean_oks"] == pytest.approx(np.mean([expected_oks(x, y) for x, y in pairs]), rel=1e-12)
    assert expected_oks(*pairs[2]) == 1.0 and expected_oks(*pairs[1]) < 0.999  # the offsets count


def test_identical_lists_are_exact():
    a, _ = lists()
    got = compare_results(a, copy.deepcopy(a)).as_dict()
    assert got == {"matched": 4, "unmatched_a": 0, "unmatched_b": 0, "max_abs_px": 0.0, "frac_within_1e-3px": 1.0,
                   "frac_within_0.5px": 1.0, "max_abs_score": 0.0, "max_abs_joint_score": 0.0, "mean_oks": 1.0}


def test_duplicate_keys_pair_in_order_and_nothing_matched_gives_none():
    r = result(7, [1.0, 2.0, 3.0, 4.0], 9)
    twin = copy.deepcopy(r)
    shift(twin, 0, 0, 1.0)
    a, b = [r, twin, copy.deepcopy(r)], [copy.deepcopy(r), copy.deepcopy(twin)]
    pairs, lone_a, lone_b = match_results(a, b)
    assert pairs == [(0, 0), (1, 1)] and (lone_a, lone_b) == (1, 0)
    assert compare_results(a, b).max_abs_px == 0.0
    empty = compare_results(a, [result(8, [0.0, 0.0, 1.0, 1.0], 1)])
    assert (empty.matched, empty.unmatched_a, empty.unmatched_b) == (0, 3, 1)
    assert empty.max_abs_px is None and empty.mean_oks is None


def test_oks_of_a_known_distance():
    # one joint per pair moved by d, the other 16 at 0: OKS = (16 + exp(-d^2 / (2 area (2 sigma)^2))) / 17
    a = np.zeros((1, 17, 2))
    b = a.copy()
    b[0, 0, 0] = 3.0
    area = np.array([100.0 * 50.0])
    e = 9.0 / (2 * 0.026) ** 2 / (5000.0 + np.spacing(1)) / 2
    assert oks(a, b, area)[0] == pytest.approx((16 + math.exp(-e)) / 17, rel=1e-12)
