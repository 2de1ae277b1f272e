"""tasks.dataset.read_rgb: transient read errors are retried, then told apart from permanent ones (issue 16)."""
from __future__ import annotations

import builtins
import errno
import os
import struct

import cv2
import numpy as np
import pytest

import tasks.dataset as dataset
from tasks.dataset import ImageError, TransientImageError, read_rgb


@pytest.fixture
def jpeg(tmp_path) -> str:
    rng = np.random.default_rng(0)
    image = cv2.resize(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (64, 48), interpolation=cv2.INTER_CUBIC)
    path = str(tmp_path / "000000000001.jpg")
    cv2.imwrite(path, image)
    return path


def _flaky_open(monkeypatch, path: str, failures: int | None, code: int = errno.EIO) -> list[str]:
    """``open`` of ``path`` fails with ``code`` ``failures`` times (None: always); returns the log of calls."""
    real_open = builtins.open
    calls: list[str] = []

    def fake_open(file, *args, **kwargs):
        if os.fspath(file) == path:
            calls.append("fail" if failures is None or len(calls) < failures else "ok")
            if calls[-1] == "fail":
                raise OSError(code, os.strerror(code), path)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    return calls


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    waited: list[float] = []
    monkeypatch.setattr(dataset.time, "sleep", waited.append)
    return waited


def test_eio_twice_then_the_image_reads(monkeypatch, jpeg, sleeps):
    expected = cv2.cvtColor(cv2.imread(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    calls = _flaky_open(monkeypatch, jpeg, failures=2)
    assert np.array_equal(read_rgb(jpeg), expected)
    assert calls == ["fail", "fail", "ok"]
    assert sleeps == [0.05, 0.1]  # short, doubling


def test_eio_every_time_is_a_transient_error_after_the_retries(monkeypatch, jpeg, sleeps):
    calls = _flaky_open(monkeypatch, jpeg, failures=None)
    with pytest.raises(TransientImageError) as caught:
        read_rgb(jpeg)
    assert isinstance(caught.value, ImageError)  # callers that skip unreadable images still catch it
    assert str(caught.value) == (f"{jpeg}: image cannot be read (Input/output error, 4 attempts); the error "
                                 "may pass: its boxes may be retried (--resume)")
    assert len(calls) == 4 and sleeps == [0.05, 0.1, 0.2]


@pytest.mark.parametrize("code", [errno.ESTALE, errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.EINTR])
def test_other_transient_errnos_are_retried(monkeypatch, jpeg, sleeps, code):
    calls = _flaky_open(monkeypatch, jpeg, failures=1, code=code)
    assert read_rgb(jpeg).shape == (48, 64, 3)
    assert calls == ["fail", "ok"] and sleeps == [0.05]


@pytest.mark.parametrize("code", [errno.EACCES, errno.EISDIR])
def test_permanent_read_errors_are_not_retried(monkeypatch, jpeg, sleeps, code):
    calls = _flaky_open(monkeypatch, jpeg, failures=None, code=code)
    with pytest.raises(ImageError, match="image cannot be read") as caught:
        read_rgb(jpeg)
    assert type(caught.value) is ImageError and calls == ["fail"] and sleeps == []


def test_missing_truncated_and_undecodable_files_are_permanent(tmp_path, jpeg, sleeps):
    with pytest.raises(ImageError, match=r"image cannot be read \(No such file or directory\)") as caught:
        read_rgb(str(tmp_path / "absent.jpg"))
    assert type(caught.value) is ImageError
    data = open(jpeg, "rb").read()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(ImageError, match="truncated JPEG"):
        read_rgb(str(tmp_path / "cut.jpg"))
    for name, content in (("empty.jpg", b""), ("text.jpg", b"not an image")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageError, match="cannot be decoded as an image") as caught:
            read_rgb(str(tmp_path / name))
        assert type(caught.value) is ImageError
    assert sleeps == []


def test_decoding_from_memory_is_cv2_imread(tmp_path, jpeg):
    """EXIF orientation and grey JPEGs come out as cv2.imread gives them (spec §3.1)."""
    ok, encoded = cv2.imencode(".jpg", cv2.imread(jpeg))
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 3, 1, 6) \
        + struct.pack("<I", 0)  # one IFD entry: Orientation = 6 (rotate 90 degrees clockwise)
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(tiff)) + b"Exif\x00\x00" + tiff
    rotated = tmp_path / "rotated.jpg"
    rotated.write_bytes(encoded.tobytes()[:2] + app1 + encoded.tobytes()[2:])
    grey = str(tmp_path / "grey.jpg")
    cv2.imwrite(grey, cv2.imread(jpeg, cv2.IMREAD_GRAYSCALE))
    for path in (str(rotated), grey, jpeg):
        assert np.array_equal(read_rgb(path), cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
    assert read_rgb(str(rotated)).shape == (64, 48, 3)  # the orientation was applied
