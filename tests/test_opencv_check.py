"""The check of the installed OpenCV's warpAffine against the fixed-point rule the pose
crop relies on (docs/numerics.md#opencv-builds)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks import opencv_check
from tasks.opencv_check import (CHECK_MATRICES, CROP_WH, PINNED_OPENCV, check_pattern, checked_warp,
                                warp_affine_linear_uint8, warp_mismatch)

REPO = Path(__file__).resolve().parents[1]


def test_installed_opencv_follows_the_rule():
    assert warp_mismatch() is None


def test_rule_on_a_hand_computed_warp():
    """Shift by half a pixel: x_src = u + 0.5 -> X = (512 + 16 + 1024u) >> 5 = 32u + 16, so
    weights 16384 / 16384; (255 * 16384 + 16384) >> 15 = 128 (127.5 rounds up). Column 1's
    right neighbour is outside (reads 0); column 2 reads nothing inside."""
    img = np.zeros((1, 2, 3), np.uint8)
    img[0, 1] = 255
    m = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]])
    assert warp_affine_linear_uint8(img, m, (3, 1))[0, :, 0].tolist() == [128, 128, 0]


def test_rule_quantises_coordinates_to_a_32nd():
    """A shift of 0.01 px is below 1/64 px: the fixed-point rule leaves the image as it is,
    where float bilinear would not."""
    pattern = check_pattern()
    m = np.array([[1.0, 0.0, 0.01], [0.0, 1.0, 0.0]])
    out = warp_affine_linear_uint8(pattern, m, (pattern.shape[1], pattern.shape[0]))
    assert np.array_equal(out, pattern)


@pytest.mark.parametrize("seed", range(6))
def test_rule_equals_installed_opencv_on_random_affines(seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (int(rng.integers(20, 300)), int(rng.integers(20, 300)), 3), dtype=np.uint8)
    for _ in range(5):
        k, rot = rng.uniform(0.2, 40), rng.uniform(-0.3, 0.3)
        m = np.array([[k * np.cos(rot), -k * np.sin(rot), rng.uniform(-300, 150)],
                      [k * np.sin(rot), k * np.cos(rot), rng.uniform(-300, 150)]])
        np.testing.assert_array_equal(warp_affine_linear_uint8(img, m, CROP_WH),
                                      cv2.warpAffine(img, m, CROP_WH, flags=cv2.INTER_LINEAR))


def test_pattern_and_matrices_exercise_border_and_saturation():
    pattern = check_pattern()
    assert pattern.shape == (120, 160, 3) and pattern.dtype == np.uint8
    assert (pattern == 0).any() and (pattern == 255).any() and len(np.unique(pattern)) == 256
    crops = [warp_affine_linear_uint8(pattern, np.array(m), CROP_WH) for m in CHECK_MATRICES]
    assert all(c.shape == (256, 192, 3) for c in crops)
    assert (crops[1][0] == 0).all()  # a box larger than the image: border rows
    assert len({c.tobytes() for c in crops}) == len(crops)


def test_one_grey_level_on_one_pixel_is_reported(monkeypatch):
    real = cv2.warpAffine
    calls = []

    def off_by_one(src, m, dsize, *args, **kwargs):
        out = real(src, m, dsize, *args, **kwargs)
        if not calls:
            out[100, 50, 1] = out[100, 50, 1] + 1 if out[100, 50, 1] < 255 else 254
        calls.append(1)
        return out

    monkeypatch.setattr(cv2, "warpAffine", off_by_one)
    message = warp_mismatch()
    assert message is not None and "\n" not in message
    assert message.startswith(f"OpenCV {cv2.__version__} (")
    assert f"in 1 of {len(CHECK_MATRICES) * 256 * 192 * 3} check values, by up to 1 grey level:" in message
    assert f"install the pinned opencv-python-headless=={PINNED_OPENCV} (requirements.txt)" in message
    assert message.endswith("or pass --allow-opencv-mismatch")
    assert len(calls) == len(CHECK_MATRICES)


def test_pinned_version_is_requirements_pin():
    pins = re.findall(r"^opencv-python-headless==(\S+)", (REPO / "requirements.txt").read_text(), re.M)
    assert pins == [PINNED_OPENCV]


def test_checked_warp_caches_per_build_atomically(tmp_path, monkeypatch):
    results = iter(["first answer", "second answer"])
    computed = []

    def fake_check():
        computed.append(1)
        return next(results)

    monkeypatch.setattr(opencv_check, "warp_mismatch", fake_check)
    assert checked_warp(tmp_path / "cache") == "first answer"
    assert checked_warp(tmp_path / "cache") == "first answer" and len(computed) == 1
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and not files[0].name.startswith(".")  # no temp file left
    record = json.loads(files[0].read_text())
    assert record["opencv"] == cv2.__version__ and record["mismatch"] == "first answer"
    assert record["key"] in files[0].name
    monkeypatch.setattr(opencv_check, "opencv_build_key", lambda: "another-build")
    assert checked_warp(tmp_path / "cache") == "second answer" and len(computed) == 2


def test_checked_warp_survives_a_broken_or_unwritable_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(opencv_check, "warp_mismatch", lambda: None)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"opencv-warp-check-{opencv_check.opencv_build_key()}.json").write_text("{not json")
    assert checked_warp(cache) is None
    assert json.loads(next(cache.iterdir()).read_text())["mismatch"] is None  # rewritten
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert checked_warp(blocker / "cache") is None  # cannot mkdir under a file: answers anyway


def test_build_key_follows_runtime_switches():
    key = opencv_check.opencv_build_key()
    use_ipp = cv2.ipp.useIPP()
    try:
        cv2.ipp.setUseIPP(not use_ipp)
        if cv2.ipp.useIPP() == use_ipp:
            pytest.skip(f"this OpenCV build cannot switch IPP {'off' if use_ipp else 'on'}")
        flipped = opencv_check.opencv_build_key()
    finally:
        cv2.ipp.setUseIPP(use_ipp)
    assert flipped != key and opencv_check.opencv_build_key() == key


def test_doctor_and_a_worker_start_report_a_mismatch_and_the_flag_lets_it_run(tmp_path, monkeypatch):
    from runner.doctor import doctor
    from tasks.opencv_check import OpencvMismatch, check_opencv

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "clean"))
    assert {c.name: c for c in doctor()}["opencv warp"].ok and check_opencv(False) is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "patched"))  # a cache per build: a fresh one here
    real = cv2.warpAffine

    def off_by_one(*args, **kwargs):
        out = real(*args, **kwargs).copy()
        out.flat[0] = out.flat[0] + 1 if out.flat[0] < 255 else 254
        return out

    monkeypatch.setattr(cv2, "warpAffine", off_by_one)
    check = {c.name: c for c in doctor()}["opencv warp"]
    assert not check.ok and "by up to 1 grey level: install the pinned" in check.detail
    with pytest.raises(OpencvMismatch, match="--allow-opencv-mismatch$"):
        check_opencv(False)
    assert check_opencv(True) == check.detail  # allowed: the worker runs and reports it
