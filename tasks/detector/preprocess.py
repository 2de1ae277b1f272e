"""A decoded BGR image -> the detector's letterboxed input (docs/numerics.md#letterbox).

The order matters for the bits: bicubic resize and 128 padding on the uint8 **BGR**
image, then BGR -> RGB, then a float32 division by 255 (traps D7, D9, D10, D22).
"""
from __future__ import annotations

import numpy as np

from .cubic_resize import resize_cubic_uint8


def letterbox_size(width: int, height: int, inp: int) -> tuple[int, int]:
    """``(new_w, new_h)``: the double-precision scale, truncated (a long side can be 607)."""
    s = min(inp / width, inp / height)
    return int(width * s), int(height * s)


def letterbox_bgr_uint8(bgr: np.ndarray, inp: int) -> np.ndarray:
    """uint8 ``[inp, inp, 3]`` BGR: bicubic resize, centred (floor offsets) on a 128 canvas.

    The resize is the project's numpy rule, not ``cv2.resize``: the installed OpenCV's
    cubic depends on its release, its CPU path and IPP (docs/numerics.md#letterbox).
    """
    h, w = bgr.shape[:2]
    new_w, new_h = letterbox_size(w, h, inp)
    resized = resize_cubic_uint8(bgr, new_w, new_h)
    canvas = np.full((inp, inp, 3), 128, np.uint8)
    top, left = (inp - new_h) // 2, (inp - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = resized
    return canvas


def letterbox_bgr_to_rgb_input(bgr: np.ndarray, inp: int) -> np.ndarray:
    """float32 ``[1, 3, inp, inp]`` RGB in [0, 1], ready for the network."""
    chw = np.ascontiguousarray(letterbox_bgr_uint8(bgr, inp)[:, :, ::-1].transpose(2, 0, 1))
    # A true float32 division: multiplying by fl32(1/255) differs in 126 of 256 values.
    return (chw.astype(np.float32) / np.float32(255.0))[None]
