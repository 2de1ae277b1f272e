"""COCO skeletons drawn on images: predictions bright, ground truth lighter, worst people first.

For the report's gallery and ``runner show``. Images are OpenCV's BGR unless ``channels="rgb"``
is given; colours below are RGB. Everything here is plain functions of arrays and dicts.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tasks.keypoint_errors import GtPerson, gt_people_by_image, image_oks

#: COCO's 19 limbs (the annotation file's ``skeleton``, 0-based).
SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
            (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))
LEFT_JOINTS = frozenset({1, 3, 5, 7, 9, 11, 13, 15})
RIGHT_JOINTS = frozenset({2, 4, 6, 8, 10, 12, 14, 16})
#: Predictions: saturated, one colour per side so a left/right inversion shows at a glance.
PRED_LEFT = (255, 140, 0)
PRED_RIGHT = (0, 170, 255)
PRED_CENTRE = (255, 0, 200)
#: Ground truth: one pale colour, thin and drawn first, so the prediction stays on top; a dark
#: edge keeps it visible on snow and sky.
GT_COLOUR = (190, 255, 190)
GT_EDGE = (40, 40, 40)
#: Joints whose confidence is below this are not drawn (nor their limbs).
MIN_KEYPOINT_SCORE = 0.05
#: Predictions below this score are left out of a drawing (a run keeps many near-zero ones).
MIN_PERSON_SCORE = 0.2
GALLERY_SIZE = 320


def limb_colour(a: int, b: int) -> tuple[int, int, int]:
    """A prediction limb's RGB colour: the side both joints are on, else the centre colour."""
    if a in LEFT_JOINTS and b in LEFT_JOINTS:
        return PRED_LEFT
    if a in RIGHT_JOINTS and b in RIGHT_JOINTS:
        return PRED_RIGHT
    return PRED_CENTRE


def _in_order(rgb: tuple[int, int, int], channels: str) -> tuple[int, int, int]:
    return rgb[::-1] if channels == "bgr" else rgb


def _point(xy: np.ndarray) -> tuple[int, int]:
    return int(round(float(xy[0]))), int(round(float(xy[1])))


def draw_skeleton(image: np.ndarray, keypoints: np.ndarray, gt: bool = False, thickness: int = 2,
                  channels: str = "bgr", min_keypoint_score: float = MIN_KEYPOINT_SCORE) -> np.ndarray:
    """Draw one person's limbs and joints on ``image`` in place; returns it.

    ``keypoints``: ``[17, 3]`` (x, y, score) for a prediction, (x, y, v) for GT, where joints
    with v = 0 are not drawn.
    """
    k = np.asarray(keypoints, dtype=np.float64).reshape(-1, 3)
    shown = k[:, 2] > 0 if gt else k[:, 2] >= min_keypoint_score
    shown &= np.isfinite(k[:, :2]).all(axis=1)
    width = max(1, thickness // 2) if gt else thickness
    limbs = [(a, b) for a, b in SKELETON if shown[a] and shown[b]]
    if gt:
        for a, b in limbs:
            cv2.line(image, _point(k[a]), _point(k[b]), _in_order(GT_EDGE, channels), width + 2, cv2.LINE_AA)
    for a, b in limbs:
        colour = _in_order(GT_COLOUR if gt else limb_colour(a, b), channels)
        cv2.line(image, _point(k[a]), _point(k[b]), colour, width, cv2.LINE_AA)
    for j in np.flatnonzero(shown):
        side = PRED_LEFT if j in LEFT_JOINTS else PRED_RIGHT if j in RIGHT_JOINTS else PRED_CENTRE
        colour = _in_order(GT_COLOUR if gt else side, channels)
        cv2.circle(image, _point(k[j]), width + 1, colour, -1, cv2.LINE_AA)
    return image


def line_thickness(image: np.ndarray) -> int:
    """Limb width that stays visible on large images and does not swamp small ones."""
    return max(2, round(max(image.shape[:2]) / 250))


def render(image: np.ndarray, predictions: Sequence[np.ndarray], gts: Sequence[np.ndarray] = (),
           channels: str = "bgr", thickness: int | None = None) -> np.ndarray:
    """A copy of ``image`` with the GT skeletons (lighter, below) and the predictions drawn."""
    out = np.ascontiguousarray(image).copy()
    thickness = line_thickness(out) if thickness is None else thickness
    for g in gts:
        draw_skeleton(out, g, gt=True, thickness=thickness, channels=channels)
    for p in predictions:
        draw_skeleton(out, p, thickness=thickness, channels=channels)
    return out


def encode_png(image_bgr: np.ndarray) -> bytes:
    """PNG bytes of a BGR image (fast compression: the report is built inside a run)."""
    ok, buf = cv2.imencode(".png", image_bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def write_png(path: str | Path, image_bgr: np.ndarray) -> Path:
    path = Path(path)
    path.write_bytes(encode_png(image_bgr))
    return path


# ---------------------------------------------------------------- who is worst


@dataclass(frozen=True)
class PersonView:
    """One person to show: where, how well the run did on them, and what to say about it."""

    image_id: int
    box: tuple[float, float, float, float]  # xywh in the image
    quality: float      # OKS of the best prediction against this GT person, or a prediction's score
    measure: str        # "oks" or "score"
    result: int | None  # the prediction that gives ``quality`` (index into results), None if none
    gt_id: int | None

    @property
    def caption(self) -> str:
        who = f"GT {self.gt_id}" if self.gt_id is not None else f"prediction {self.result}"
        return f"image {self.image_id} · {who} · {self.measure} {self.quality:.3f}"


@dataclass(frozen=True)
class Poses:
    """A run's results and the GT, indexed by image once for every drawing."""

    results: Sequence[dict]
    rows: Mapping[int, list[int]]          # image id -> indices into results
    people: Mapping[int, list[GtPerson]]   # image id -> GT people (empty without GT)
    gt_boxes: Mapping[int, Sequence[float]]  # GT id -> xywh
    has_gt: bool


def index_poses(results: Sequence[dict], gt: dict | None = None) -> Poses:
    rows: dict[int, list[int]] = {}
    for i, r in enumerate(results):
        rows.setdefault(int(r["image_id"]), []).append(i)
    people = gt_people_by_image(gt) if gt is not None else {}
    boxes = {int(a["id"]): a.get("bbox") for a in gt["annotations"]} if gt is not None else {}
    return Poses(results, rows, people, boxes, gt is not None)


def _xy(result: dict) -> np.ndarray:
    return np.asarray(result["keypoints"], dtype=np.float64).reshape(-1, 3)[:, :2]


def _extent(xy: np.ndarray) -> tuple[float, float, float, float]:
    x0, y0 = np.nanmin(xy, axis=0)
    x1, y1 = np.nanmax(xy, axis=0)
    return float(x0), float(y0), float(x1 - x0), float(y1 - y0)


def _gt_views(poses: Poses) -> list[PersonView]:
    """Every GT person with visible joints, measured by the best OKS any prediction of the image reaches."""
    views = []
    for image_id, people in poses.people.items():
        people = [p for p in people if p.visible.any() and not p.iscrowd]
        if not people:
            continue
        mine = poses.rows.get(image_id, [])
        oks = (image_oks(np.stack([_xy(poses.results[i]) for i in mine]), people,
                         [poses.gt_boxes[p.id] for p in people]) if mine else np.zeros((0, len(people))))
        for j, p in enumerate(people):
            best = int(np.argmax(oks[:, j])) if len(mine) else -1
            box = poses.gt_boxes[p.id] or _extent(p.xy[p.visible])
            views.append(PersonView(image_id, tuple(float(v) for v in box),
                                    float(oks[best, j]) if best >= 0 else 0.0, "oks",
                                    mine[best] if best >= 0 else None, p.id))
    return views


def _score_views(poses: Poses, min_score: float) -> list[PersonView]:
    """Without GT: every prediction worth drawing, measured by its own score."""
    views = []
    for i, r in enumerate(poses.results):
        if r["score"] >= min_score:
            box = r.get("bbox") or _extent(_xy(r))
            views.append(PersonView(int(r["image_id"]), tuple(float(v) for v in box), float(r["score"]),
                                    "score", i, None))
    return views


def worst_persons(poses: Poses, n: int | None = None, min_score: float = MIN_PERSON_SCORE) -> list[PersonView]:
    """People by ascending quality: GT people by the best OKS reached (a missed person has 0),
    or without GT the predictions of score >= ``min_score`` by score."""
    views = _gt_views(poses) if poses.has_gt else _score_views(poses, min_score)
    views.sort(key=lambda v: (v.quality, v.image_id, v.gt_id or 0, v.result or 0))
    return views[:n] if n is not None else views


def worst_images(poses: Poses, n: int | None = None, min_score: float = MIN_PERSON_SCORE) -> list[int]:
    """Image ids ordered by their worst person (``worst_persons``), each once."""
    ids = list(dict.fromkeys(v.image_id for v in worst_persons(poses, None, min_score)))
    return ids[:n] if n is not None else ids


# ---------------------------------------------------------------- renderings


def _drawn_predictions(poses: Poses, image_id: int, min_score: float, always: int | None = None
                       ) -> list[np.ndarray]:
    return [np.asarray(poses.results[i]["keypoints"], dtype=np.float64).reshape(-1, 3)
            for i in poses.rows.get(image_id, []) if poses.results[i]["score"] >= min_score or i == always]


def _gt_keypoints(poses: Poses, image_id: int) -> list[np.ndarray]:
    return [np.concatenate([p.xy, p.visible[:, None].astype(np.float64)], axis=1)
            for p in poses.people.get(image_id, [])]


def render_image(image: np.ndarray, image_id: int, poses: Poses, min_score: float = MIN_PERSON_SCORE,
                 channels: str = "bgr") -> np.ndarray:
    """The whole image with its predictions of score >= ``min_score`` and (lighter) its GT drawn."""
    return render(image, _drawn_predictions(poses, image_id, min_score), _gt_keypoints(poses, image_id), channels)


def crop_window(box: Sequence[float], shape: tuple[int, ...], margin: float = 0.25,
                min_side: float = 48.0) -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 around ``box`` (xywh) grown by ``margin`` each side, inside the image."""
    x, y, w, h = (float(v) for v in box)
    cx, cy = x + w / 2, y + h / 2
    half_w = max(w * (1 + 2 * margin), min_side) / 2
    half_h = max(h * (1 + 2 * margin), min_side) / 2
    x0, y0 = max(0, int(np.floor(cx - half_w))), max(0, int(np.floor(cy - half_h)))
    x1, y1 = min(shape[1], int(np.ceil(cx + half_w))), min(shape[0], int(np.ceil(cy + half_h)))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def _moved(keypoints: np.ndarray, x0: int, y0: int, scale: float) -> np.ndarray:
    k = keypoints.copy()
    k[:, 0] = (k[:, 0] - x0) * scale
    k[:, 1] = (k[:, 1] - y0) * scale
    return k


def render_person(image: np.ndarray, view: PersonView, poses: Poses, size: int = GALLERY_SIZE,
                  min_score: float = MIN_PERSON_SCORE, channels: str = "bgr") -> np.ndarray:
    """A crop around one person, its longer side ``size`` px, with every skeleton in it drawn.

    Drawn after resizing, so lines stay sharp on small people. The prediction that gives the
    person's OKS is drawn whatever its score.
    """
    x0, y0, x1, y1 = crop_window(view.box, image.shape)
    scale = size / max(x1 - x0, y1 - y0)
    crop = cv2.resize(image[y0:y1, x0:x1], (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))),
                      interpolation=cv2.INTER_LINEAR)
    preds = [_moved(k, x0, y0, scale) for k in _drawn_predictions(poses, view.image_id, min_score, view.result)]
    gts = [_moved(k, x0, y0, scale) for k in _gt_keypoints(poses, view.image_id)]
    return render(crop, preds, gts, channels, thickness=line_thickness(crop))


def read_bgr(path: str | Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"{path}: cannot read the image")
    return image


def gallery(image_paths: Mapping[int, str], results: Sequence[dict], gt: dict | None = None, n: int = 12,
            min_score: float = MIN_PERSON_SCORE, size: int = GALLERY_SIZE) -> list[tuple[str, bytes]]:
    """(caption, PNG bytes) of the ``n`` worst people, worst first, for the report's gallery.

    Each image is read once however many of its people are shown.
    """
    poses = index_poses(results, gt)
    views = [v for v in worst_persons(poses, None, min_score) if v.image_id in image_paths][:n]
    images = {i: read_bgr(image_paths[i]) for i in dict.fromkeys(v.image_id for v in views)}
    return [(v.caption, encode_png(render_person(images[v.image_id], v, poses, size, min_score))) for v in views]


def show_images(image_paths: Mapping[int, str], results: Sequence[dict], out_dir: str | Path,
                gt: dict | None = None, image_ids: Sequence[int] | None = None, n: int = 8,
                min_score: float = MIN_PERSON_SCORE) -> list[Path]:
    """``runner show``: PNGs of ``image_ids`` (default: the ``n`` worst images) with skeletons drawn.

    Written as ``OUT_DIR/<image id, 12 digits>.png``; returns the paths in the order shown.
    """
    poses = index_poses(results, gt)
    ids = list(image_ids) if image_ids else worst_images(poses, n, min_score)
    missing = [i for i in ids if i not in image_paths]
    if missing:
        raise KeyError(f"images not in the set: {missing[:5]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [write_png(out / f"{i:012d}.png", render_image(read_bgr(image_paths[i]), i, poses, min_score))
            for i in ids]
