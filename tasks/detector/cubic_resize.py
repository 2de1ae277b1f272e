"""The detector's bicubic resize as a numpy rule, the same bytes on every platform.

The rule is classic OpenCV's fixed-point ``INTER_CUBIC`` for uint8, as the OpenCV 4.13
x86-64 build computes it with IPP off. What ``cv2.resize`` returns is no stable reference:
the x86-64 wheels send this call to Intel IPP, a float kernel (2.9% of letterbox values
differ from the rule by 1) whose bits move between releases (4.12 -> 4.13 changed 362 of
540 test cases, 4.13 -> 4.14 changed 42), and a build without IPP (ARM64) runs the classic
code, where fused multiply-adds may round otherwise (docs/numerics.md#letterbox). The rule:

1. Per output column (and, the same way, per row): ``f = float32((d + 0.5) * scale - 0.5)``
   with ``scale = 1 / (dst / src)`` in double; ``s = floor(f)``, ``t = f - s``.
2. Cubic weights for ``t`` in float32 (A = -0.75, OpenCV's operation order), each
   rounded half-to-even to 11 fractional bits (``* 2048``). Taps ``s-1 .. s+2``, indices
   clamped to the image (replicated border).
3. Horizontal pass in integers: ``H = sum(w_k * p_k)`` (int32, 11 fractional bits).
4. Vertical pass, as OpenCV's SSE code does it for the first ``8 * floor(W*C / 8)``
   interleaved values of each row: float32 ``H_3*b_3``, then ``H_k*b_k + acc`` for k = 2, 1, 0
   (``b_k = w_k / 2**22``, a multiply and an add, no FMA), rounded half-to-even. The last
   ``W*C mod 8`` values take the scalar path: ``(sum(H_k * w_k) + 2**21) >> 22``.
5. Saturate to 0..255.

Both paths of step 4 are needed: an all-integer vertical pass gives other bytes in 1,036
of the 65 M values of 83 real COCO letterboxes (a sum that is exactly k + 0.5 with k even).
"""
from __future__ import annotations

import numpy as np

COEF_BITS = 11                      # INTER_RESIZE_COEF_BITS
COEF_SCALE = 1 << COEF_BITS
SIMD_LANES = 8                      # int16 lanes of a 128-bit register: the x86-64 baseline build
_A = np.float32(-0.75)
_F32 = np.float32


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """float32 ``[n, 4]`` weights for fractions ``t``, in OpenCV's float32 operation order.

    Each product and sum is rounded separately: a fused multiply-add (what ARM64
    compilers emit by default) changes the last bit and, rarely, a rounded weight.
    """
    one = _F32(1)
    t1 = t + one
    w0 = ((_A * t1 - _F32(5) * _A) * t1 + _F32(8) * _A) * t1 - _F32(4) * _A
    w1 = ((_A + _F32(2)) * t - (_A + _F32(3))) * t * t + one
    u = one - t
    w2 = ((_A + _F32(2)) * u - (_A + _F32(3))) * u * u + one
    w3 = one - w0 - w1 - w2
    return np.stack([w0, w1, w2, w3], axis=1)


def cubic_taps(src_len: int, dst_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index [dst_len, 4] intp, weight [dst_len, 4] int32)`` along one axis.

    Indices are clamped to ``[0, src_len)``: OpenCV replicates the border pixel.
    """
    scale = 1.0 / (dst_len / src_len)  # not src/dst: OpenCV inverts the inverse scale
    f = ((np.arange(dst_len, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f)
    t = (f - s).astype(np.float32)
    weights = np.rint(_cubic_weights(t) * _F32(COEF_SCALE)).astype(np.int32)
    index = np.clip(s.astype(np.intp)[:, None] + np.arange(-1, 3), 0, src_len - 1)
    return index, weights


def _horizontal(rows: np.ndarray, new_w: int) -> np.ndarray:
    """float32 ``[R, new_w * C]``: the integer horizontal pass over uint8 ``[R, W, C]`` rows.

    Held in float32 because every product (|255 * w| < 2**19) and every sum (< 2**20) is
    an integer below 2**24, so float32 is exact here, and the vertical pass wants float32.
    """
    r, w, c = rows.shape
    index, weights = cubic_taps(w, new_w)
    # Interleaved columns as OpenCV walks them: column x, channel k -> x * C + k.
    flat = rows.reshape(r, w * c).astype(np.float32)
    cols = (index[:, None, :] * c + np.arange(c)[None, :, None]).reshape(new_w * c, 4)
    wts = np.repeat(weights, c, axis=0).astype(np.float32)
    out = np.take(flat, cols[:, 0], axis=1)
    out *= wts[:, 0]
    tmp = np.empty_like(out)
    for k in range(1, 4):
        np.take(flat, cols[:, k], axis=1, out=tmp, mode="clip")  # "raise" would go through a temporary
        tmp *= wts[:, k]
        out += tmp
    return out


def _vertical(horiz: np.ndarray, rows: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """uint8 ``[new_h, W*C]``: output row ``i`` mixes ``horiz[rows[i, k]]`` with ``beta[i, k]``.

    Most of a row goes through OpenCV's float32 SIMD arithmetic, the remainder of the row
    through its integer one (module docstring, step 4).
    """
    width = horiz.shape[1]
    split = width - width % SIMD_LANES
    out = np.empty((rows.shape[0], width), np.uint8)
    if split:
        simd = horiz[:, :split]
        b = beta.astype(np.float32) * _F32(1.0 / (COEF_SCALE * COEF_SCALE))  # exact: a power of 2
        acc = np.take(simd, rows[:, 3], axis=0)
        acc *= b[:, 3:4]
        tmp = np.empty_like(acc)
        for k in (2, 1, 0):
            np.take(simd, rows[:, k], axis=0, out=tmp, mode="clip")
            tmp *= b[:, k:k + 1]
            acc += tmp  # H_k*b_k + acc: one product, one sum, each rounded (no FMA)
        np.rint(acc, out=acc)
        out[:, :split] = np.clip(acc, 0, 255, out=acc)
    if split < width:
        tail = horiz[:, split:].astype(np.int32)
        total = sum(tail[rows[:, k]] * beta[:, k:k + 1] for k in range(4))
        out[:, split:] = np.clip((total + (1 << (2 * COEF_BITS - 1))) >> (2 * COEF_BITS), 0, 255)
    return out


def resize_cubic_uint8(img: np.ndarray, new_w: int, new_h: int) -> np.ndarray:
    """``cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_CUBIC)`` for uint8, as
    OpenCV 4.13 on x86-64 computes it, in numpy only.

    ``img`` is ``[H, W]`` or ``[H, W, C]`` uint8; the result has the same layout.
    """
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"resize_cubic_uint8: need a uint8 [H, W] or [H, W, C] array, got {img.dtype} "
                         f"{list(img.shape)}")
    if new_w <= 0 or new_h <= 0 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"resize_cubic_uint8: empty size {list(img.shape[:2])} -> {[new_h, new_w]}")
    src = img if img.ndim == 3 else img[:, :, None]
    h, w, c = src.shape
    if (w, h) == (new_w, new_h):
        return img.copy()  # OpenCV copies too (and the cubic weights are 0, 1, 0, 0 anyway)
    yindex, beta = cubic_taps(h, new_h)
    # Only the source rows some output row reads go through the horizontal pass.
    rows, inverse = np.unique(yindex, return_inverse=True)
    out = _vertical(_horizontal(src[rows], new_w), inverse.reshape(yindex.shape), beta)
    return out.reshape((new_h, new_w, c) if img.ndim == 3 else (new_h, new_w))
