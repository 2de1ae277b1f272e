"""Box -> crop -> network input, bit-identical to upstream AlphaPose with OpenCV 4.x.

The rules and what breaks without them: docs/numerics.md#crop-box,
docs/numerics.md#affine, docs/numerics.md#input. Every float32 rounding below is one
that upstream makes; removing one changes crops (traps T8, T21, docs/numerics.md#traps).
All functions are pure and work on numpy arrays.
"""
from __future__ import annotations

import cv2
import numpy as np

from tasks.spec import FASTPOSE, ModelSpec

ASPECT_RATIO = 192 / 256  # input width / height
SCALE_MULT = 1.25

if int(cv2.__version__.split(".")[0]) >= 5:
    # OpenCV 5 interpolates warpAffine in floating point: crops differ by up to 6 grey levels.
    raise ImportError(f"OpenCV {cv2.__version__} is not supported: "
                      "pip install 'opencv-python-headless>=4.8,<5' (spec trap T3)")

f32 = np.float32


def box_xywh_to_center_scale(xywh: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Detection ``[x, y, w, h]`` -> float32 center and float32 scale (w, h) of the crop."""
    x, y, w, h = (float(v) for v in xywh)
    # Upstream goes through corners and back, which can change w, h in the last bit.
    w, h = (x + w) - x, (y + h) - y
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=f32)
    if w > ASPECT_RATIO * h:
        h = w / ASPECT_RATIO
    elif w < ASPECT_RATIO * h:
        w = h * ASPECT_RATIO
    scale = np.array([w, h], dtype=f32)
    if center[0] != -1:  # upstream's sentinel for "no box"; kept so numbers stay identical
        scale = scale * f32(SCALE_MULT)
    return center, scale


def center_scale_to_crop_box(center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 ``[x1, y1, x2, y2]`` of the crop, by the numpy-1 rule (trap T20).

    Intermediates are float64 and rounded once, as upstream computed them in the
    reference era; numpy >= 2 would round after every step (1 ulp on x2/y2, up to
    6.1e-5 px on decoded keypoints, never scores): docs/numerics.md#crop-box.
    """
    c = center.astype(np.float64)
    s = scale.astype(np.float64)
    x1, y1 = c[0] - s[0] * 0.5, c[1] - s[1] * 0.5
    return np.array([x1, y1, x1 + s[0], y1 + s[1]], dtype=f32)


def _affine_points(center: np.ndarray, width: float) -> np.ndarray:
    """The three float32 points upstream solves the affine from (docs/numerics.md#affine)."""
    p = np.zeros((3, 2), dtype=f32)
    c = np.asarray(center, dtype=np.float64)
    p[0] = c
    p[1] = c + np.array([0.0, -0.5 * float(width)])  # float64 sum, one rounding
    d = p[0] - p[1]
    p[2] = p[1] + np.array([-d[1], d[0]], dtype=f32)  # float32 op
    return p


def affine_matrix(center: np.ndarray, width: float, out_wh: tuple[int, int],
                  inverse: bool = False) -> np.ndarray:
    """float64 2x3 map from image to output pixels (or back with ``inverse``).

    Only the width of the scale is used (trap T6). Solved from float32-rounded
    points, not the closed form: small boxes differ by up to 0.1 px (trap T21).
    """
    src = _affine_points(center, width)
    out_w, out_h = out_wh
    dst = _affine_points(np.array([out_w * 0.5, out_h * 0.5]), out_w)
    return cv2.getAffineTransform(dst, src) if inverse else cv2.getAffineTransform(src, dst)


def crop_rgb(image_rgb: np.ndarray, center: np.ndarray, scale: np.ndarray,
             spec: ModelSpec = FASTPOSE) -> np.ndarray:
    """uint8 ``[256, 192, 3]`` crop; pixels outside the image are 0 (trap T4: crop before normalising)."""
    h, w = spec.input_hw
    m = affine_matrix(center, float(scale[0]), (w, h))
    return cv2.warpAffine(image_rgb, m, (w, h), flags=cv2.INTER_LINEAR)


def _normalisation_tables(spec: ModelSpec) -> np.ndarray:
    """``[2, 3, 256]`` float32: value of pixel p in channel c, with and without /255.

    Bit-exact form is fl32(fl32(p / 255) - fl32(mean_c)) (docs/numerics.md#input); a
    table makes it exact and cheap.
    """
    p = np.arange(256, dtype=f32)
    mean = np.array(spec.mean_rgb, dtype=f32)[:, None]
    divided = (p / f32(255))[None, :] - mean
    raw = p[None, :] - mean  # trap T9: a crop whose max is <= 1 is not divided by 255
    return np.stack([divided, raw]).astype(f32)


_TABLES = _normalisation_tables(FASTPOSE)


def crops_to_input(crops: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 ``[n, 256, 192, 3]`` RGB crops -> float32 ``[n, 3, 256, 192]`` network input (into ``out``)."""
    n, h, w, _ = crops.shape
    out = np.empty((n, 3, h, w), dtype=f32) if out is None else out
    for i in range(n):
        table = _TABLES[0] if crops[i].max() > 1 else _TABLES[1]
        # a table lookup per plane, straight into the CHW output (0.12 ms a crop, vs
        # 0.18 for numpy's take from the interleaved HWC crop)
        for c, plane in enumerate(cv2.split(crops[i])):
            cv2.LUT(plane, table[c], dst=out[i, c])
    return out


def flip_input(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Mirror the float ``[n, 3, H, W]`` network input along its width (into ``out``; docs/numerics.md#flip;
    trap T19: not a re-crop)."""
    out = np.empty_like(x) if out is None else out
    for image, mirrored in zip(x, out):
        for plane, flipped in zip(image, mirrored):
            cv2.flip(plane, 1, dst=flipped)  # a copy in reverse order, 4x faster than numpy's of a reversed view
    return out


def flip_crops(crops: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Mirror uint8 ``[n, H, W, 3]`` crops along their width (into ``out``): the uint8-input model's flip pass."""
    out = np.empty_like(crops) if out is None else out
    for crop, mirrored in zip(crops, out):
        cv2.flip(crop, 1, dst=mirrored)  # 15x faster than numpy's copy of a reversed view
    return out


def crop_area(crop_box: np.ndarray) -> float:
    """Area of the crop box in float64 from its float32 corners; OKS-NMS uses it (trap T11)."""
    x1, y1, x2, y2 = (float(v) for v in crop_box)
    return (x2 - x1) * (y2 - y1)
