"""Heatmaps -> keypoints in image pixels: flip merge (docs/numerics.md#flip) and decode
(docs/numerics.md#decode)."""
from __future__ import annotations

import numpy as np

from tasks.spec import FASTPOSE, ModelSpec
from tasks.transforms import affine_matrix

f32 = np.float32


def flip_back(heatmaps_flipped: np.ndarray, spec: ModelSpec = FASTPOSE) -> np.ndarray:
    """Undo the mirror on heatmaps of a mirrored input: mirror, swap joints, shift one column.

    Deliberate fix (trap T1): this is the clean shift ``G[..., 0] = F[..., 0]``,
    ``G[..., x] = F[..., x-1]``. Upstream writes it as an in-place copy onto an
    overlapping view, which PyTorch leaves undefined; on CPU it smears columns
    33..47 and moves 37% of the keypoints of a random network. On CUDA (where
    upstream's 71.73 was measured) it behaves as the clean shift. Why the shift exists
    at all: docs/numerics.md#flip.
    """
    f = heatmaps_flipped[..., ::-1][:, spec.flip_order()]
    g = np.empty_like(heatmaps_flipped)
    g[..., 0] = f[..., 0]
    g[..., 1:] = f[..., :-1]
    return g


def flip_merge(heatmaps: np.ndarray, heatmaps_flipped: np.ndarray, spec: ModelSpec = FASTPOSE) -> np.ndarray:
    """The flip-test average, as float32 ops (docs/numerics.md#flip): ``(H + flip_back(F)) / 2``.

    Written per joint into one output instead of through flip_back's full-size
    temporaries: the same float32 sums (tests), at 0.05 instead of 0.07 ms a box
    of host time, which the actor spends while its device runs.
    """
    out = np.empty_like(heatmaps)
    for j, k in enumerate(spec.flip_order()):
        # flip_back(F)[..., j, :, x] = F[..., k, :, W - x] for x >= 1, and F[..., k, :, W - 1] at x = 0
        np.add(heatmaps[:, j, :, 1:], heatmaps_flipped[:, k, :, :0:-1], out=out[:, j, :, 1:])
        np.add(heatmaps[:, j, :, 0], heatmaps_flipped[:, k, :, -1], out=out[:, j, :, 0])
    out /= f32(2)
    return out


def heatmap_argmax(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[n, J, H, W]`` -> float32 heatmap coords ``[n, J, 2]`` and maxima ``[n, J]``.

    First maximum in row-major order; joints whose maximum is not > 0 go to (0, 0)
    but keep their (possibly negative) score. Interior maxima move a quarter pixel
    towards the higher neighbour (trap T10: only for 2 <= x <= W-2, 2 <= y <= H-2).
    """
    n, j, h, w = heatmaps.shape
    flat = heatmaps.reshape(n, j, h * w)
    idx = flat.argmax(axis=2)
    maxvals = np.take_along_axis(flat, idx[..., None], axis=2)[..., 0]
    valid = maxvals > 0
    px = np.where(valid, idx % w, 0)
    py = np.where(valid, idx // w, 0)
    coords = np.stack([px, py], axis=-1).astype(f32)

    inner = (px > 1) & (px < w - 1) & (py > 1) & (py < h - 1)
    ni, ji = np.nonzero(inner)
    x, y = px[ni, ji], py[ni, ji]
    hm = heatmaps[ni, ji]
    k = np.arange(len(ni))
    dx = hm[k, y, x + 1] - hm[k, y, x - 1]
    dy = hm[k, y + 1, x] - hm[k, y - 1, x]
    coords[ni, ji, 0] += np.sign(dx).astype(f32) * f32(0.25)
    coords[ni, ji, 1] += np.sign(dy).astype(f32) * f32(0.25)
    return coords, maxvals.astype(f32, copy=False)


def heatmap_to_image(coords: np.ndarray, crop_boxes: np.ndarray, spec: ModelSpec = FASTPOSE) -> np.ndarray:
    """Heatmap coords ``[n, J, 2]`` -> float32 image pixels, through each crop box.

    Heatmap point (24, 32) is the crop centre and one heatmap pixel is w/48 image
    pixels in both axes (trap T7). The map is solved from float32 points like
    upstream's, then applied in float64 and stored as float32.
    """
    hm_h, hm_w = spec.heatmap_hw
    out = np.empty(coords.shape, dtype=f32)
    for i, box in enumerate(crop_boxes):
        x1, y1, x2, y2 = (float(v) for v in box)
        w, h = x2 - x1, y2 - y1
        m = affine_matrix(np.array([x1 + w * 0.5, y1 + h * 0.5]), w, (hm_w, hm_h), inverse=True)
        pts = coords[i].astype(np.float64)
        out[i] = pts @ m[:, :2].T + m[:, 2]
    return out


def decode_keypoints(heatmaps: np.ndarray, crop_boxes: np.ndarray, spec: ModelSpec = FASTPOSE) -> np.ndarray:
    """Flip-merged heatmaps ``[n, 17, 64, 48]`` -> float32 ``[n, 17, 3]`` (x, y, score) in image pixels."""
    coords, maxvals = heatmap_argmax(heatmaps)
    xy = heatmap_to_image(coords, crop_boxes, spec)
    return np.concatenate([xy, maxvals[..., None]], axis=-1)
