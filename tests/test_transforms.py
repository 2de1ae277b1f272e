"""Box -> crop -> input, held against numbers computed by hand from the spec (§3).

The expected values below were computed outside this code base, straight from
the spec's formulas in Python floats with numpy float32 rounding where the spec
rounds: recompute w, h through the corners; center = fl32(x + w/2, y + h/2);
widen to aspect 0.75; scale = fl32(fl32(w, h) * 1.25); crop box by the numpy-1
rule fl32(c - s/2), fl32((c - s/2) + s); the affine's ideal form k = 192 / s,
t = (96 - k*cx, 128 - k*cy). Detection 0 is also the spec's worked example (§9b).
"""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from conftest import COCO_MINI, COCO_MINI_DETS, requires_shared
from tasks.dataset import read_rgb
from tasks.transforms import (affine_matrix, box_xywh_to_center_scale, center_scale_to_crop_box, crop_rgb,
                              crops_to_input, flip_crops, flip_input)

# det index -> (bbox, center, scale, crop box, (k, tx, ty))
HAND = {
    0: ([277.1183158543966, 45.699667786163765, 225.09126579259754, 333.5602652943344],
        [389.6639404296875, 212.47979736328125], [312.7127380371094, 416.9503479003906],
        [233.3075714111328, 4.0046234130859375, 546.0203247070312, 420.9549560546875],
        (0.6139820245416914, -143.24665503591257, -2.458776159315761)),
    50: ([284.4247396061427, 58.40109305610073, 77.51981649355616, 85.87582588813615],  # wide: h = w / 0.75
         [323.1846618652344, 101.33900451660156], [96.89976501464844, 129.19969177246094],
         [274.7347717285156, 36.739158630371094, 371.6345520019531, 165.9388427734375],
         (1.981428953630333, -544.3674463890043, -72.79603768126941)),
    117: ([441.55283109201787, 70.93636919677598, 12.61247065074889, 34.04032271350583],  # small and narrow
          [447.85906982421875, 87.95652770996094], [31.912803649902344, 42.55039978027344],
          [431.9026794433594, 66.68132781982422, 463.8154602050781, 109.23172760009766],
          (6.016393987389057, -2598.4966148880853, -401.1811244658279)),
}


@pytest.mark.parametrize("index", sorted(HAND))
def test_center_scale_crop_box_and_affine_by_hand(index):
    bbox, center, scale, crop_box, (k, tx, ty) = HAND[index]
    c, s = box_xywh_to_center_scale(bbox)
    assert c.dtype == s.dtype == np.float32
    assert c.tolist() == center and s.tolist() == scale
    assert center_scale_to_crop_box(c, s).tolist() == crop_box
    m = affine_matrix(c, float(s[0]), (192, 256))
    # Solved from float32-rounded points (trap T21): close to, not equal to, the ideal form.
    # Scales within 2e-6 relative, translation within the spec's 0.12 crop px for small boxes.
    np.testing.assert_allclose(np.diag(m[:, :2]), [k, k], rtol=2e-6)
    np.testing.assert_allclose(m[:, 2], [tx, ty], rtol=0, atol=0.12)
    assert abs(m[0, 1]) < 1e-12 and abs(m[1, 0]) < 1e-12


def test_worked_example_matrix():
    c, s = box_xywh_to_center_scale(HAND[0][0])
    m = affine_matrix(c, float(s[0]), (192, 256))
    # spec §9b, as cv2.getAffineTransform gives it upstream
    assert m[0, 0] == 0.6139820245416916 and m[1, 1] == 0.6139820245416914
    assert m[0, 2] == -143.24665503591257 and m[1, 2] == -2.45877615931577


def warp_fixed_point(img: np.ndarray, m: np.ndarray, out_hw=(256, 192)) -> np.ndarray:
    """OpenCV 4.x's INTER_LINEAR warpAffine, written from spec §3.4 in plain numpy."""
    a, b, c = m[0]
    d, e, f = m[1]
    det = a * e - b * d
    D = 1.0 / det if det != 0 else 0.0
    A = np.array([[e * D, -b * D, -(e * D) * c - (-b * D) * f],
                  [-d * D, a * D, -(-d * D) * c - (a * D) * f]])
    h, w = out_hw
    u = np.arange(w)[None, :]
    v = np.arange(h)[:, None]
    X = (np.rint((A[0, 1] * v + A[0, 2]) * 1024).astype(np.int64) + 16
         + np.rint(A[0, 0] * u * 1024).astype(np.int64)) >> 5
    Y = (np.rint((A[1, 1] * v + A[1, 2]) * 1024).astype(np.int64) + 16
         + np.rint(A[1, 0] * u * 1024).astype(np.int64)) >> 5
    ix, fx, iy, fy = X >> 5, X & 31, Y >> 5, Y & 31
    H, W = img.shape[:2]

    def px(yy, xx):
        inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        out = np.zeros((*yy.shape, 3), np.int64)
        out[inside] = img[yy[inside], xx[inside]]
        return out

    w00 = ((32 - fx) * (32 - fy) * 32)[..., None]
    w01 = (fx * (32 - fy) * 32)[..., None]
    w10 = ((32 - fx) * fy * 32)[..., None]
    w11 = (fx * fy * 32)[..., None]
    acc = w00 * px(iy, ix) + w01 * px(iy, ix + 1) + w10 * px(iy + 1, ix) + w11 * px(iy + 1, ix + 1)
    return np.clip((acc + 16384) >> 15, 0, 255).astype(np.uint8)


def _synthetic_image(seed=0, hw=(300, 420)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*hw, 3), dtype=np.uint8)


def test_crop_equals_fixed_point_rule_on_synthetic_image():
    img = _synthetic_image()
    for bbox in ([50.3, 20.7, 120.25, 230.5], [300.0, 250.0, 200.0, 90.0], [-20.5, -10.0, 30.0, 40.0]):
        c, s = box_xywh_to_center_scale(bbox)
        np.testing.assert_array_equal(crop_rgb(img, c, s), warp_fixed_point(img, affine_matrix(c, float(s[0]), (192, 256))))


@requires_shared
@pytest.mark.parametrize("index", sorted(HAND))
def test_real_detection_crops_and_inputs(index):
    det = json.loads(COCO_MINI_DETS.read_text())[index]
    img = read_rgb(str(COCO_MINI / "val2017" / f"{det['image_id']:012d}.jpg"))
    c, s = box_xywh_to_center_scale(det["bbox"])
    crop = crop_rgb(img, c, s)
    assert crop.shape == (256, 192, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, warp_fixed_point(img, affine_matrix(c, float(s[0]), (192, 256))))
    x = crops_to_input(crop[None])
    assert x.shape == (1, 3, 256, 192) and x.dtype == np.float32
    # spec §3.5 bit-exact form, channel by channel: fl32(fl32(p / 255) - fl32(mean_c))
    for ch, mean in enumerate((0.406, 0.457, 0.480)):
        expect = (crop[..., ch].astype(np.float32) / np.float32(255)) - np.float32(mean)
        np.testing.assert_array_equal(x[0, ch], expect)


def test_normalisation_constants_and_padding():
    crop = np.zeros((1, 256, 192, 3), np.uint8)
    crop[0, 0, 0] = (255, 128, 2)
    x = crops_to_input(crop)
    assert x[0, :, 5, 5].tolist() == [np.float32(0) - np.float32(0.406), -np.float32(0.457), -np.float32(0.48)]
    assert x[0, 0, 0, 0] == np.float32(np.float32(1.0) - np.float32(0.406))
    assert x[0, 1, 0, 0] == np.float32(np.float32(128) / np.float32(255) - np.float32(0.457))
    # float64 then one rounding differs in the last bit for most values: float32 steps are required
    assert x[0, 2, 0, 0] == np.float32(np.float32(2) / np.float32(255) - np.float32(0.48))


def test_random_crops_match_the_formula_in_every_pixel():
    crops = np.random.default_rng(3).integers(0, 256, (3, 256, 192, 3), dtype=np.uint8)
    x = crops_to_input(crops)
    for ch, mean in enumerate((0.406, 0.457, 0.480)):
        expect = (crops[..., ch].astype(np.float32) / np.float32(255)) - np.float32(mean)
        np.testing.assert_array_equal(x[:, ch], expect)


def test_dark_crop_is_not_divided_by_255():  # trap T9
    crop = np.ones((1, 256, 192, 3), np.uint8)
    x = crops_to_input(crop)
    assert x[0, 0, 0, 0] == np.float32(1) - np.float32(0.406)


def test_flip_crops_mirrors_width_like_flip_input():
    crops = np.random.default_rng(4).integers(0, 256, (2, 256, 192, 3), dtype=np.uint8)
    np.testing.assert_array_equal(flip_crops(crops), crops[:, :, ::-1])
    np.testing.assert_array_equal(crops_to_input(flip_crops(crops)), flip_input(crops_to_input(crops)))


def test_flip_input_mirrors_width():
    x = np.arange(2 * 3 * 256 * 192, dtype=np.float32).reshape(2, 3, 256, 192)
    f = flip_input(x)
    assert f[1, 2, 10, 0] == x[1, 2, 10, 191] and f[0, 0, 0, 191] == x[0, 0, 0, 0]
    assert f.flags.c_contiguous


def test_opencv_major_is_4():  # trap T3: OpenCV 5 warps differently
    assert int(cv2.__version__.split(".")[0]) == 4
