"""Is the installed OpenCV's ``warpAffine`` the fixed-point rule the pose crop relies on?

The pose crop (``transforms.crop_rgb``) calls ``cv2.warpAffine(uint8 RGB, M, (192, 256),
INTER_LINEAR)`` with the constant 0 border. Classic OpenCV 4.x computes it in fixed point;
OpenCV 5 (182,358 of this check's 737,280 values, by up to 7 grey levels under 5.1),
hardware-specific builds and float kernels give other crops, and every later number moves
with them. This module restates the rule in numpy
(docs/numerics.md#opencv-builds), warps a fixed pattern both ways and says whether the
installed OpenCV agrees. The rule:

1. Invert M in float64 as OpenCV does: ``D = 1 / (a*e - b*d)`` (0 if singular).
2. Output pixel (u, v) -> source coordinates with 5 fractional bits (INTER_BITS):
   ``X = (rnd((A01*v + A02) * 1024) + 16 + rnd(A00*u * 1024)) >> 5`` (AB_BITS = 10,
   ``rnd`` = round half to even), the same for Y.
3. Integer part ``X >> 5``, fraction ``X & 31``; weights ``(32-fx)(32-fy)*32`` ... summing
   to 2**15 (INTER_REMAP_COEF_BITS).
4. ``(sum(w * p) + 2**14) >> 15``; a neighbour outside the image reads 0.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np

from tasks.errors import UserError
from tasks.files import atomic_write_text

PINNED_OPENCV = "4.14.0.94"   # requirements.txt's pin (a test keeps the two equal)
RULE_VERSION = 1               # bump when the rule or the pattern changes: old cache entries go stale
CROP_WH = (192, 256)           # the pose crop's dsize (width, height)
INTER_BITS = 5
AB_BITS = 10
REMAP_BITS = 15

# Image -> crop matrices, as transforms.affine_matrix makes them for boxes on the 160x120
# pattern: a person box, a box larger than the image (border on all sides), a 3x4 px box
# (47x upscale, off-diagonal terms of 1e-15), the whole image; plus a rotation, which no
# crop uses but which exercises both fractions at once.
CHECK_MATRICES: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] = (
    ((2.144502617801047, -0.0, -33.742408376963354), (5.1382222627279974e-17, 2.1445026178010473, -0.670157068062831)),
    ((0.6144000000000001, -0.0, 31.488000000000003), (-6.767073673905717e-17, 0.6144, 57.344)),
    ((47.62790697674406, -0.0, -7131.53488372091), (-5.993375299986348e-15, 47.627906976744185, -4770.5301598837195)),
    ((0.96, -0.0, 19.2), (0.0, 0.96, 70.4)),
    ((0.9, -0.3, 60.0), (0.3, 0.9, 40.5)),
)


def check_pattern(width: int = 160, height: int = 120) -> np.ndarray:
    """uint8 ``[height, width, 3]``: smooth ramps with saturated blocks, from integer arithmetic
    only, so it is the same array on every platform and numpy version."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    c = np.arange(3, dtype=np.int64)[None, None, :]
    img = (x[..., None] ** 2 * 7 + y[..., None] ** 2 * 3 + (x * y)[..., None] * 5 + c * 85) % 256
    img[((x // 9 + y // 7) % 5 == 0)] = 255   # bright blocks: sums that reach 255 * 2**15
    img[((x // 11 + y // 13) % 7 == 0)] = 0
    return img.astype(np.uint8)


def _invert_affine(m: np.ndarray) -> np.ndarray:
    """OpenCV's own inversion (same operations, so the same float64 bits)."""
    a, b, c = (float(v) for v in m[0])
    d, e, f = (float(v) for v in m[1])
    det = a * e - b * d
    det = 1.0 / det if det != 0 else 0.0
    a11, a22 = e * det, a * det
    a12, a21 = b * -det, d * -det
    return np.array([[a11, a12, -a11 * c - a12 * f], [a21, a22, -a21 * c - a22 * f]])


def _round_int(v: np.ndarray) -> np.ndarray:
    """``saturate_cast<int>(double)``: round half to even, clamp to int32."""
    return np.clip(np.rint(v), -2**31, 2**31 - 1).astype(np.int64)


def warp_affine_linear_uint8(img: np.ndarray, m: np.ndarray, dsize: tuple[int, int]) -> np.ndarray:
    """``cv2.warpAffine(img, m, dsize, flags=INTER_LINEAR)`` (constant 0 border) by the
    fixed-point rule, for uint8 ``[H, W, C]``; ``dsize`` is (width, height)."""
    h, w, cn = img.shape
    out_w, out_h = dsize
    inv = _invert_affine(np.asarray(m, dtype=np.float64))
    scale = 1 << AB_BITS
    u = np.arange(out_w, dtype=np.float64)
    v = np.arange(out_h, dtype=np.float64)[:, None]
    half = scale >> INTER_BITS >> 1           # round_delta: half a 1/32 step, in 1/1024 units
    shift = AB_BITS - INTER_BITS
    xs = (_round_int((inv[0, 1] * v + inv[0, 2]) * scale) + half + _round_int(inv[0, 0] * u * scale)) >> shift
    ys = (_round_int((inv[1, 1] * v + inv[1, 2]) * scale) + half + _round_int(inv[1, 0] * u * scale)) >> shift
    mask = (1 << INTER_BITS) - 1
    ix, fx = np.clip(xs >> INTER_BITS, -2**15, 2**15 - 1), xs & mask   # OpenCV stores shorts
    iy, fy = np.clip(ys >> INTER_BITS, -2**15, 2**15 - 1), ys & mask
    one = 1 << INTER_BITS
    unit = 1 << (REMAP_BITS - 2 * INTER_BITS)
    acc = np.zeros((out_h, out_w, cn), np.int64)
    for dy, wy in ((0, one - fy), (1, fy)):
        for dx, wx in ((0, one - fx), (1, fx)):
            sx, sy = ix + dx, iy + dy
            inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
            pix = img[np.clip(sy, 0, h - 1), np.clip(sx, 0, w - 1)].astype(np.int64)
            acc += np.where(inside[..., None], pix, 0) * (wx * wy * unit)[..., None]
    return np.clip((acc + (1 << (REMAP_BITS - 1))) >> REMAP_BITS, 0, 255).astype(np.uint8)


def warp_mismatch() -> str | None:
    """None when the installed ``cv2.warpAffine`` equals the rule on the check pattern,
    else one line: the OpenCV version, how many crop values differ and by how much, the way out."""
    import cv2

    pattern = check_pattern()
    differ = total = worst = 0
    for m in CHECK_MATRICES:
        m = np.array(m, dtype=np.float64)
        got = cv2.warpAffine(pattern, m, CROP_WH, flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        diff = np.abs(got.astype(np.int16) - warp_affine_linear_uint8(pattern, m, CROP_WH))
        differ += int(np.count_nonzero(diff))
        total += diff.size
        worst = max(worst, int(diff.max()))
    if differ == 0:
        return None
    return (f"OpenCV {cv2.__version__} ({platform.machine()}): warpAffine differs from the fixed-point rule "
            f"the pose crop needs in {differ} of {total} check values, by up to {worst} grey "
            f"level{'s' if worst > 1 else ''}: install the pinned opencv-python-headless=={PINNED_OPENCV} "
            "(requirements.txt), or pass --allow-opencv-mismatch")


def opencv_build_key() -> str:
    """What the check's answer depends on: OpenCV version and build, its runtime switches, the CPU kind."""
    import cv2

    text = "\n".join([str(RULE_VERSION), cv2.__version__, platform.machine(), str(cv2.useOptimized()),
                      str(cv2.ipp.useIPP()), cv2.getBuildInformation()])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def checked_warp(cache_dir: str | Path) -> str | None:
    """``warp_mismatch()``, remembered in ``cache_dir`` per OpenCV build and machine kind.

    A cache that cannot be read is ignored and one that cannot be written is skipped:
    the check itself takes a few milliseconds, the cache only spares it per worker start.
    """
    import cv2

    key = opencv_build_key()
    path = Path(cache_dir) / f"opencv-warp-check-{key}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["mismatch"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    mismatch = warp_mismatch()
    record = {"key": key, "opencv": cv2.__version__, "machine": platform.machine(), "mismatch": mismatch}
    _write_atomically(path, json.dumps(record))
    return mismatch


def _write_atomically(path: Path, text: str) -> None:
    """Whole file or nothing, even with several workers starting at once on one cache; a cache that
    cannot be written is skipped (the check runs again next time)."""
    with contextlib.suppress(OSError):
        atomic_write_text(path, text)


class OpencvMismatch(UserError, RuntimeError):
    """This host's OpenCV does not warp as the pose crop needs; the message is one line with the way out."""


def cache_dir() -> Path:
    """Where a host keeps its checks: ``$XDG_CACHE_HOME/runner`` (``~/.cache/runner``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "runner"


def check_opencv(allow_mismatch: bool) -> str | None:
    """The cached check of this host's OpenCV: None when it follows the rule, else its line.

    A mismatch raises ``OpencvMismatch`` unless ``allow_mismatch`` (``--allow-opencv-mismatch``).
    """
    mismatch = checked_warp(cache_dir())
    if mismatch and not allow_mismatch:
        raise OpencvMismatch(mismatch)
    return mismatch
