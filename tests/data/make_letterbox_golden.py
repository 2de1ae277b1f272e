"""How ``letterbox_golden.npz`` was made: OpenCV 4.13.0's classic bicubic, stored as arrays.

The golden outputs come from OpenCV itself, not from the project's numpy rule, so the
test compares two independent computations. Run it outside the project's environment,
with numpy and ``opencv-python-headless==4.13.0.92`` only, on x86-64:

    python -m venv /tmp/cv413 && /tmp/cv413/bin/pip install numpy opencv-python-headless==4.13.0.92
    /tmp/cv413/bin/python tests/data/make_letterbox_golden.py golden [SHARED_DIR]

then, with the newest OpenCV 4.x (the project's environment will do), keep the stored full
outputs that this OpenCV's own ``cv2.resize`` gets wrong, and record by how much:

    python tests/data/make_letterbox_golden.py mark

IPP is switched off for the golden run: the x86-64 wheels send 8-bit INTER_CUBIC through
Intel IPP, a float kernel whose last bit depends on the IPP release and CPU path
(docs/numerics.md#letterbox). The classic fixed-point code is the rule.

Inputs are not stored: ``case_input`` regenerates them from a seed with integer numpy
arithmetic, and their sha256 is stored so that a changed random stream is told apart
from a changed letterbox. Only numpy is imported at module level: the test imports
``case_input`` and ``CASES_KEYS`` from here.
"""
from __future__ import annotations

import glob
import hashlib
import os
import platform
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "letterbox_golden.npz"
INP = 608
KIND_LETTERBOX, KIND_RESIZE = 0, 1
CASES_KEYS = ("seed", "src_w", "src_h", "channels", "dst_w", "dst_h", "kind")
REAL_GLOBS = ("coco-mini/val2017/*.jpg", "coco-val2017-subset79/val2017/*.jpg")
N_COCO_LIKE, N_ARBITRARY = 420, 120
FULL_CANDIDATES = 10


def sha256(a: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).digest()


def _digests(items: list[bytes]) -> np.ndarray:
    """uint8 ``[n, 32]``: numpy's bytes dtype would drop a digest's trailing zero bytes."""
    return np.array([np.frombuffer(d, np.uint8) for d in items]).reshape(len(items), 32)


def letterbox_size(width: int, height: int, inp: int) -> tuple[int, int]:
    """The detector's rule (tasks/detector/preprocess.py), restated so this script needs no project code."""
    s = min(inp / width, inp / height)
    return int(width * s), int(height * s)


def _box_blur(img: np.ndarray, k: int) -> np.ndarray:
    """Integer box mean over k x k by cumulative sums: the same on every platform."""
    c = np.cumsum(np.cumsum(np.pad(img.astype(np.int64), ((k, 0), (k, 0), (0, 0)), mode="edge"), 0), 1)
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) // (k * k)


def case_input(seed: int, w: int, h: int, channels: int) -> np.ndarray:
    """uint8 ``[h, w, channels]`` (``[h, w]`` for 1): noise, smooth, photo-like or saturated blocks."""
    rng = np.random.default_rng(seed)
    style = seed % 4
    if style == 0:
        img = rng.integers(0, 256, (h, w, channels), dtype=np.int64)
    else:
        cell = int(rng.integers(4, 33))
        coarse = rng.integers(0, 256, (h // cell + 2, w // cell + 2, channels), dtype=np.int64)
        img = np.repeat(np.repeat(coarse, cell, 0), cell, 1)[:h, :w]
        if style in (1, 2):
            img = _box_blur(img, max(1, cell // 2))
        if style == 2:  # sensor noise and a few saturated objects: the cubic over/undershoots at their edges
            img = img + rng.integers(-8, 9, img.shape, dtype=np.int64)
            for _ in range(4):
                x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
                value = 255 * int(rng.integers(0, 2))  # drawn before the extents, as the data was made
                dy, dx = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
                img[y0:y0 + dy, x0:x0 + dx] = value
        if style == 3:
            img = np.where(img >= 128, 255, 0)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img[:, :, 0] if channels == 1 else img


def make_cases() -> np.ndarray:
    """int64 ``[N, 7]`` rows of CASES_KEYS: COCO-like letterboxes, then arbitrary resizes."""
    rng = np.random.default_rng(20240613)
    rows = []
    for i in range(N_COCO_LIKE):
        long = 640 if rng.random() < 0.7 else int(rng.integers(300, 641))
        short = int(rng.integers(200, long + 1))
        w, h = (long, short) if rng.random() < 0.6 else (short, long)
        rows.append((1000 + i, w, h, 3, *letterbox_size(w, h, INP), KIND_LETTERBOX))
    special = [(1, 1), (1, 700), (700, 1), (2, 3), (3, 2), (5, 600), (600, 5), (300, 150), (150, 300)]
    for i in range(N_ARBITRARY):
        w, h = (int(v) for v in rng.integers(1, 701, 2))
        if i < len(special):  # extremes of both scales and a 1-pixel source
            dw, dh = special[i]
        elif i % 7 == 0:      # one axis left at its size
            dw, dh = w, int(rng.integers(1, 901))
        elif i % 11 == 0:     # exact factors
            w, h = w - w % 2 + 2, h - h % 2 + 2
            dw, dh = (w * 2, h * 2) if i % 2 else (w // 2, h // 2)
        else:
            dw, dh = (int(v) for v in rng.integers(1, 901, 2))
        channels = (3, 3, 1, 4)[i % 4]
        rows.append((5000 + i, w, h, channels, dw, dh, KIND_RESIZE))
    return np.array(rows, dtype=np.int64)


def _opencv_resize(img: np.ndarray, dw: int, dh: int) -> np.ndarray:
    import cv2

    return cv2.resize(img, (dw, dh), interpolation=cv2.INTER_CUBIC)


def _letterbox(bgr: np.ndarray, resize) -> np.ndarray:
    h, w = bgr.shape[:2]
    nw, nh = letterbox_size(w, h, INP)
    canvas = np.full((INP, INP, 3), 128, np.uint8)
    top, left = (INP - nh) // 2, (INP - nw) // 2
    canvas[top:top + nh, left:left + nw] = resize(bgr, nw, nh)
    return canvas


def case_output(row: np.ndarray, resize) -> np.ndarray:
    seed, w, h, ch, dw, dh, kind = (int(v) for v in row)
    img = case_input(seed, w, h, ch)
    return _letterbox(img, resize) if kind == KIND_LETTERBOX else resize(img, dw, dh)


def _full_candidates(cases: np.ndarray) -> list[int]:
    """Small arbitrary resizes (cheap to store) and one whole smooth letterbox canvas."""
    small = [i for i, r in enumerate(cases) if r[6] == KIND_RESIZE and r[4] * r[5] <= 20000 and r[4] * r[5] >= 64]
    canvas = [i for i, r in enumerate(cases) if r[6] == KIND_LETTERBOX and r[0] % 4 == 1][:1]
    return small[:FULL_CANDIDATES - 1] + canvas


def golden(shared: Path) -> None:
    import cv2

    assert cv2.__version__ == "4.13.0", f"make the golden data with OpenCV 4.13.0, not {cv2.__version__}"
    cv2.ipp.setUseIPP(False)
    assert not cv2.ipp.useIPP()
    cases = make_cases()
    outs = [case_output(r, _opencv_resize) for r in cases]
    inputs = [case_input(*(int(v) for v in r[:4])) for r in cases]
    cand = _full_candidates(cases)
    names, real_in, real_out = [], [], []
    for pattern in REAL_GLOBS:
        for f in sorted(glob.glob(str(shared / "data" / pattern))):
            bgr = cv2.imread(f)
            names.append(os.path.relpath(f, shared / "data"))
            real_in.append(sha256(bgr))
            real_out.append(sha256(_letterbox(bgr, _opencv_resize)))
    # what OpenCV 4.13's default (IPP) path gives, for the record
    cv2.ipp.setUseIPP(True)
    ipp_differs = sum(sha256(case_output(r, _opencv_resize)) != sha256(o) for r, o in zip(cases, outs))
    np.savez_compressed(
        OUT, cases=cases, cases_keys=np.array(CASES_KEYS), input_sha=_digests([sha256(i) for i in inputs]),
        golden_sha=_digests([sha256(o) for o in outs]), full_index=np.array(cand, dtype=np.int64),
        **{f"full_{k}": outs[i] for k, i in enumerate(cand)},
        real_names=np.array(names), real_input_sha=_digests(real_in),
        real_golden_sha=_digests(real_out),
        made_with=np.array(f"opencv {cv2.__version__} classic (IPP off), numpy {np.__version__}, "
                           f"{platform.machine()}"))
    print(f"{OUT.name}: {len(cases)} cases, {len(names)} real images, {len(cand)} full outputs; "
          f"OpenCV {cv2.__version__}'s default (IPP) path differs from the classic golden in {ipp_differs} cases")


def mark() -> None:
    """Keep the full outputs that the installed OpenCV's own resize gets wrong, with the count."""
    import cv2

    stored = dict(np.load(OUT))
    data = {k: v for k, v in stored.items() if not k.startswith("full_")}
    cases = data["cases"]
    kept = []
    for k, i in enumerate(stored["full_index"]):
        diff = int(np.count_nonzero(case_output(cases[i], _opencv_resize) != stored[f"full_{k}"]))
        if diff:
            kept.append((int(i), stored[f"full_{k}"], diff))
    data.update({f"full_{n}": out for n, (_, out, _) in enumerate(kept)})
    data["full_index"] = np.array([i for i, _, _ in kept], dtype=np.int64)
    data["full_opencv_differs"] = np.array([d for _, _, d in kept], dtype=np.int64)
    data["full_marked_with"] = np.array(f"opencv {cv2.__version__} default path ({platform.machine()})")
    per_case = {}
    for ipp in (True, False):
        cv2.ipp.setUseIPP(ipp)
        per_case[ipp] = sum(sha256(case_output(r, _opencv_resize)) != g.tobytes()
                            for r, g in zip(cases, data["golden_sha"]))
    cv2.ipp.setUseIPP(True)
    np.savez_compressed(OUT, **data)
    print(f"OpenCV {cv2.__version__}: {len(kept)} of {len(stored['full_index'])} stored full outputs differ "
          f"from its own resize ({[d for _, _, d in kept]} values); of all {len(cases)} cases its default "
          f"path differs in {per_case[True]}, its classic path (IPP off) in {per_case[False]}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["golden"]:
        golden(Path(sys.argv[2]) if len(sys.argv) > 2 else HERE.parents[2] / "shared")
    elif sys.argv[1:2] == ["mark"]:
        mark()
    else:
        sys.exit(__doc__)
