"""Flip merge and heatmap decode against the spec's definitions (§4, §6)."""
from __future__ import annotations

import numpy as np

from tasks.decode import decode_keypoints, flip_back, flip_merge, heatmap_argmax, heatmap_to_image
from tasks.spec import FASTPOSE


def test_flip_back_is_mirror_swap_and_clean_shift():
    rng = np.random.default_rng(0)
    hf = rng.standard_normal((2, 17, 64, 48)).astype(np.float32)
    g = flip_back(hf)
    swap = {0: 0}
    for a, b in FASTPOSE.flip_pairs:
        swap[a], swap[b] = b, a
    for j in range(17):
        f = hf[:, swap[j], :, ::-1]
        assert np.array_equal(g[:, j, :, 0], f[..., 0])
        assert np.array_equal(g[:, j, :, 1:], f[..., :-1])  # trap T1: no smear over columns 33..47


def test_flip_merge_is_the_float32_average_with_flip_back():
    rng = np.random.default_rng(1)
    h, hf = rng.standard_normal((2, 3, 17, 64, 48)).astype(np.float32)
    merged = flip_merge(h, hf)
    assert merged.dtype == np.float32
    np.testing.assert_array_equal(merged, (h + flip_back(hf)) / np.float32(2))


def test_flip_moves_a_peak_by_a_quarter_pixel():
    # A network sees a keypoint at heatmap x in the crop at 47.75 - x in the mirror;
    # flip back puts it at x + 0.25 (spec §4, trap T2).
    hf = np.zeros((1, 17, 64, 48), np.float32)
    hf[0, 0, 30, 47 - 20] = 1.0  # nose at mirrored column 27 -> original column 20 after mirror, 21 after shift
    assert np.argwhere(flip_back(hf)[0, 0]).tolist() == [[30, 21]]
    merged = flip_merge(np.zeros_like(hf), hf)
    assert merged.dtype == np.float32 and merged[0, 0, 30, 21] == np.float32(0.5)


def test_argmax_first_max_mask_and_quarter_offset():
    h = np.full((1, 17, 64, 48), -1.0, np.float32)
    h[0, 0, 10, 20] = 5; h[0, 0, 10, 21] = 3; h[0, 0, 10, 19] = 1; h[0, 0, 11, 20] = 2; h[0, 0, 9, 20] = 2
    h[0, 1, 5, 5] = 2; h[0, 1, 6, 6] = 2  # tie: first in row-major order wins
    h[0, 2, 1, 30] = 4  # py = 1: no offset (needs 2 <= py <= 62)
    h[0, 3] = -0.5  # max not > 0: masked to (0, 0), score kept
    h[0, 4, 62, 46] = 1; h[0, 4, 62, 47] = 0.5; h[0, 4, 63, 46] = 0.9  # last interior cell still offsets
    coords, scores = heatmap_argmax(h)
    assert coords.dtype == np.float32 and scores.dtype == np.float32
    assert coords[0, 0].tolist() == [20.25, 10.0]  # sign(0) = 0 in y
    assert coords[0, 1].tolist() == [5.0, 5.0]
    assert coords[0, 2].tolist() == [30.0, 1.0]
    assert coords[0, 3].tolist() == [0.0, 0.0] and scores[0, 3] == np.float32(-0.5)
    assert coords[0, 4].tolist() == [46.25, 62.25]
    assert scores[0, 0] == 5


def test_worked_example_decode():  # spec §9b
    crop_box = np.array([[233.3075714111328, 4.0046234130859375, 546.0203247070312, 420.9549560546875]], np.float32)
    xy = heatmap_to_image(np.array([[[30.25, 20.75]]], np.float32), crop_box)
    assert xy.dtype == np.float32 and xy[0, 0].tolist() == [430.3817443847656, 139.187744140625]


def test_decode_closed_form_within_spec_tolerance():
    rng = np.random.default_rng(1)
    heat = rng.standard_normal((5, 17, 64, 48)).astype(np.float32)
    boxes = np.array([[10, 20, 110, 153.3], [-5, 3, 40, 50], [0, 0, 4, 5.33], [300, 10, 600, 410], [1, 2, 3, 4]],
                     np.float32)
    k = decode_keypoints(heat, boxes)
    coords, scores = heatmap_argmax(heat)
    b = boxes.astype(np.float64)
    w = b[:, 2] - b[:, 0]
    cx, cy = b[:, 0] + w / 2, b[:, 1] + (b[:, 3] - b[:, 1]) / 2
    x = cx[:, None] + (coords[..., 0] - 24) * w[:, None] / 48
    y = cy[:, None] + (coords[..., 1] - 32) * w[:, None] / 48  # both axes use the width (trap T7)
    np.testing.assert_allclose(k[..., 0], x, atol=1e-4 * np.abs(x).max() + 1e-4)
    np.testing.assert_allclose(k[..., 1], y, atol=1e-4 * np.abs(y).max() + 1e-4)
    assert np.array_equal(k[..., 2], scores)
