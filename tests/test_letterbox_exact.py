"""The letterbox's bicubic resize equals OpenCV 4.13.0's classic one, bit for bit, whatever
OpenCV is installed (docs/numerics.md#letterbox).

Golden data: tests/data/letterbox_golden.npz, made by tests/data/make_letterbox_golden.py
with OpenCV 4.13.0 in a separate environment. Inputs are regenerated from seeds.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.detector.cubic_resize import cubic_taps, resize_cubic_uint8
from tasks.detector.preprocess import letterbox_bgr_uint8, letterbox_size

DATA = Path(__file__).resolve().parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared"


def _load_maker():
    spec = importlib.util.spec_from_file_location("make_letterbox_golden", DATA / "make_letterbox_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


maker = _load_maker()


@pytest.fixture(scope="module")
def golden() -> dict:
    with np.load(DATA / "letterbox_golden.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture
def no_cv2_resize(monkeypatch):
    """The letterbox must not fall back to the installed OpenCV's resize."""
    def refuse(*args, **kwargs):
        raise AssertionError("cv2.resize called: its cubic depends on the OpenCV build")
    monkeypatch.setattr(cv2, "resize", refuse)


def _sha(a: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).digest()


def _project_output(row: np.ndarray, img: np.ndarray) -> np.ndarray:
    _, w, h, _, dw, dh, kind = (int(v) for v in row)
    if kind == maker.KIND_LETTERBOX:
        assert letterbox_size(w, h, 608) == (dw, dh)  # the script's restated rule is the project's
        return letterbox_bgr_uint8(img, 608)
    return resize_cubic_uint8(img, dw, dh)


def test_golden_data_covers_what_it_claims(golden):
    cases = golden["cases"]
    assert tuple(golden["cases_keys"]) == maker.CASES_KEYS
    letterbox = cases[cases[:, 6] == maker.KIND_LETTERBOX]
    resize = cases[cases[:, 6] == maker.KIND_RESIZE]
    assert len(cases) >= 500 and len(letterbox) >= 400 and len(resize) >= 100
    assert ((letterbox[:, 1:3] >= 200) & (letterbox[:, 1:3] <= 640)).all()
    assert (letterbox[:, 1] > letterbox[:, 2]).any() and (letterbox[:, 1] < letterbox[:, 2]).any()
    assert (resize[:, 4] > resize[:, 1]).any() and (resize[:, 4] < resize[:, 1]).any()  # up and down
    assert set(resize[:, 3]) == {1, 3, 4}
    assert str(golden["made_with"]).startswith("opencv 4.13.0 classic")


def test_random_images_bit_exact_with_opencv_413(golden, no_cv2_resize):
    """540 seeded images of COCO-like and arbitrary sizes; a failure lists the cases."""
    stale_inputs, wrong = [], []
    for row, in_sha, out_sha in zip(golden["cases"], golden["input_sha"], golden["golden_sha"]):
        img = maker.case_input(*(int(v) for v in row[:4]))
        if _sha(img) != in_sha.tobytes():
            stale_inputs.append(int(row[0]))
            continue
        if _sha(_project_output(row, img)) != out_sha.tobytes():
            wrong.append(row.tolist())
    assert not stale_inputs, f"numpy regenerates other inputs for seeds {stale_inputs[:10]}: remake the golden data"
    assert not wrong, f"{len(wrong)} of {len(golden['cases'])} cases differ from OpenCV 4.13.0, e.g. {wrong[:5]}"


def test_cases_where_newer_opencv_differs_are_exact(golden, no_cv2_resize):
    """Stored whole: the cases where OpenCV 4.14's own cv2.resize gives other bytes."""
    index, differs = golden["full_index"], golden["full_opencv_differs"]
    assert len(index) >= 5 and (differs > 0).all()
    assert str(golden["full_marked_with"]).startswith("opencv 4.14")
    for k, i in enumerate(index):
        row = golden["cases"][i]
        got = _project_output(row, maker.case_input(*(int(v) for v in row[:4])))
        np.testing.assert_array_equal(got, golden[f"full_{k}"], err_msg=f"case {row.tolist()}")


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared (reference data) is absent: a user's clone has none")
def test_real_coco_images_bit_exact(golden, no_cv2_resize):
    names = [str(n) for n in golden["real_names"]]
    assert len(names) == 83
    decoded_differently, wrong = [], []
    for name, in_sha, out_sha in zip(names, golden["real_input_sha"], golden["real_golden_sha"]):
        path = SHARED / "data" / name
        if not path.is_file():
            pytest.skip(f"{path} is absent")
        bgr = cv2.imread(str(path))
        if _sha(bgr) != in_sha.tobytes():
            decoded_differently.append(name)  # the JPEG decoder, not the letterbox
        elif _sha(letterbox_bgr_uint8(bgr, 608)) != out_sha.tobytes():
            wrong.append(name)
    assert not decoded_differently, f"cv2.imread {cv2.__version__} decodes {decoded_differently[:5]} differently"
    assert not wrong, f"{len(wrong)} of {len(names)} letterboxes differ from OpenCV 4.13.0: {wrong[:5]}"


def test_half_pixel_taps_and_weights():
    """A 2x downscale puts every output at t = 0.5: weights (-0.09375, 0.59375, 0.59375,
    -0.09375) * 2048, taps clamped at both borders."""
    index, weights = cubic_taps(4, 2)
    assert index.tolist() == [[0, 0, 1, 2], [1, 2, 3, 3]]
    assert weights.tolist() == [[-192, 1216, 1216, -192]] * 2


def test_undershoot_and_overshoot_saturate():
    """A 0/255 edge upscaled 4 -> 8: at t = 0.25 the weights are (-216, 1800, 536, -72) / 2048,
    so 255 * 464 / 2048 = 57.8 -> 58, 255 * 1584 / 2048 = 197.2 -> 197; the taps that
    reach past the edge give -26.9 and 281.9, clipped to 0 and 255."""
    row = np.array([[0, 0, 255, 255]], np.uint8)
    assert cubic_taps(4, 8)[1][3].tolist() == [-216, 1800, 536, -72]
    assert resize_cubic_uint8(row, 8, 1).tolist() == [[0, 0, 0, 58, 197, 255, 255, 255]]


def test_float32_body_and_integer_tail_round_a_half_differently():
    """8 -> 4 puts output 1 at t = 0.5 on taps (0, 24, 24, 0): 1216 * 48 / 2048 = 28.5 exactly.
    OpenCV's SIMD body rounds that half to even (28); its scalar tail adds half and
    shifts (29). A gray row of 4 values is all tail; an RGB row of 12 has a body of 8."""
    row = np.array([[0, 0, 24, 24, 0, 0, 0, 0]], np.uint8)
    assert resize_cubic_uint8(row, 4, 1).tolist() == [[0, 29, 0, 0]]
    rgb = np.repeat(row[:, :, None], 3, axis=2)
    assert resize_cubic_uint8(rgb, 4, 1)[0, 1].tolist() == [28, 28, 28]


def test_shapes_dtypes_and_errors():
    img = np.arange(60, dtype=np.uint8).reshape(4, 5, 3)
    same = resize_cubic_uint8(img, 5, 4)
    assert np.array_equal(same, img) and same is not img
    assert resize_cubic_uint8(img[:, :, 0], 9, 2).shape == (2, 9)
    assert resize_cubic_uint8(img, 9, 2).shape == (2, 9, 3)
    with pytest.raises(ValueError, match="uint8"):
        resize_cubic_uint8(img.astype(np.float32), 3, 3)
    with pytest.raises(ValueError, match="empty"):
        resize_cubic_uint8(img, 0, 3)
