"""A COCO root and a box source -> the list of person boxes to run, each with a stable id.

Layout: ``DATAROOT/val2017/<file_name>`` and
``DATAROOT/annotations/person_keypoints_val2017.json``. Boxes come from a
detection file (a COCO results list, used unfiltered and in file order, as
upstream does: trap T16, docs/numerics.md#boxes) or from the ground truth.
"""
from __future__ import annotations

import errno
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from tasks.errors import UserError

ANNOTATIONS = "annotations/person_keypoints_val2017.json"
IMAGES = "val2017"


class DataError(UserError, ValueError):
    """A problem with the user's data; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class Box:
    """One person box. ``id`` is its position in the box source, stable across runs."""

    id: int
    image_id: int
    xywh: tuple[float, float, float, float]
    score: float


@dataclass(frozen=True)
class Skipped:
    box_index: int
    image_id: int | None
    reason: str


@dataclass
class BoxSet:
    boxes: list[Box]
    image_paths: dict[int, str]  # image id -> file, for every image a box refers to
    ann_file: str
    source: str  # the detection file, or "gt"
    skipped: list[Skipped] = field(default_factory=list)


def _load_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: {what} is not valid JSON ({e}); "
                        "give a COCO file or re-download it") from None


def load_annotations(ann_file: str) -> dict:
    ann = _load_json(ann_file, "annotation file")
    if not isinstance(ann, dict) or not isinstance(ann.get("images"), list) \
            or not isinstance(ann.get("annotations"), list):
        raise DataError(f"{ann_file}: not a COCO annotation file (needs 'images' and 'annotations' lists)")
    return ann


def _image_paths(ann: dict, image_root: str) -> dict[int, str]:
    return {int(im["id"]): os.path.join(image_root, im.get("file_name", f"{int(im['id']):012d}.jpg"))
            for im in ann["images"]}


def _box_problem(xywh) -> str | None:
    if not (isinstance(xywh, (list, tuple)) and len(xywh) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xywh)):
        return "bbox is not 4 numbers [x, y, w, h]"
    if not all(math.isfinite(v) for v in xywh):
        return "bbox has NaN or infinite values"
    if xywh[2] <= 0 or xywh[3] <= 0:
        return "bbox has zero or negative width or height"
    return None


def _image_id_of(entry: dict) -> int:
    """An int image id; a string id is parsed from the file basename, as upstream does."""
    image_id = entry["image_id"]
    if isinstance(image_id, bool):
        raise TypeError
    if isinstance(image_id, str):
        return int(os.path.splitext(os.path.basename(image_id))[0])
    if isinstance(image_id, float) and image_id.is_integer():
        return int(image_id)
    if not isinstance(image_id, int):
        raise TypeError
    return image_id


def boxes_from_detections(det_file: str, ann: dict) -> tuple[list[Box], list[Skipped]]:
    """Every entry of a COCO results list, in file order; unusable boxes are skipped with a reason.

    Structural problems (not a list, missing or mistyped fields, unknown image ids)
    stop the run: they mean the file is not what the user thinks it is.
    """
    dets = _load_json(det_file, "detection file")
    if not isinstance(dets, list):
        raise DataError(f"{det_file}: a detection file is a JSON list of "
                        f"{{image_id, category_id, bbox: [x, y, w, h], score}}, got {type(dets).__name__}")
    known = {int(im["id"]) for im in ann["images"]}
    boxes: list[Box] = []
    skipped: list[Skipped] = []
    unknown: list[int] = []
    for i, d in enumerate(dets):
        if not isinstance(d, dict):
            raise DataError(f"{det_file}: entry {i} is not an object; expected "
                            "{image_id, category_id, bbox: [x, y, w, h], score}")
        missing = [k for k in ("image_id", "bbox", "score") if k not in d]
        if missing:
            raise DataError(f"{det_file}: entry {i} lacks {', '.join(missing)}; each detection needs "
                            "image_id, bbox [x, y, w, h] and score (COCO results format)")
        try:
            image_id = _image_id_of(d)
        except (TypeError, ValueError):
            raise DataError(f"{det_file}: entry {i}: image_id {d['image_id']!r} is not an integer id") from None
        score = d["score"]
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            raise DataError(f"{det_file}: entry {i}: score {score!r} is not a number")
        if d.get("category_id", 1) != 1:
            raise DataError(f"{det_file}: entry {i} has category_id {d['category_id']!r}; "
                            "only person boxes (category_id 1) can be used: filter the file first")
        if image_id not in known:
            unknown.append(image_id)
            continue
        problem = _box_problem(d["bbox"])
        if problem is None and not math.isfinite(score):
            problem = "score is NaN or infinite"
        if problem:
            skipped.append(Skipped(i, image_id, problem))
            continue
        boxes.append(Box(i, image_id, tuple(float(v) for v in d["bbox"]), float(score)))
    if unknown:
        ids = sorted(set(unknown))
        raise DataError(f"{det_file}: {len(unknown)} detections refer to {len(ids)} image ids not in the "
                        f"annotation file (e.g. {', '.join(map(str, ids[:3]))}); "
                        "use the detection file made for this annotation set")
    return boxes, skipped


def boxes_from_ground_truth(ann: dict) -> list[Box]:
    """GT person boxes that COCOeval scores: not crowd, ``num_keypoints > 0``; score 1."""
    boxes = []
    for a in ann["annotations"]:
        if a.get("category_id", 1) == 1 and not a.get("iscrowd", 0) and a.get("num_keypoints", 0) > 0:
            boxes.append(Box(len(boxes), int(a["image_id"]), tuple(float(v) for v in a["bbox"]), 1.0))
    return boxes


def load_boxes(dataroot: str, dets: str | None = None, ann_file: str | None = None) -> BoxSet:
    """The boxes to run: from ``dets`` (a COCO results file) or, when it is None, the GT."""
    root = Path(dataroot)
    if not root.is_dir():
        raise DataError(f"{dataroot}: dataroot not found; it must hold {IMAGES}/ and {ANNOTATIONS}")
    ann_file = ann_file or str(root / ANNOTATIONS)
    ann = load_annotations(ann_file)
    if dets is None:
        boxes, skipped, source = boxes_from_ground_truth(ann), [], "gt"
    else:
        (boxes, skipped), source = boxes_from_detections(dets, ann), dets
    paths = _image_paths(ann, str(root / IMAGES))
    used = {b.image_id for b in boxes}
    return BoxSet(boxes, {i: paths[i] for i in sorted(used)}, ann_file, source, skipped)


def missing_images(box_set: BoxSet) -> list[str]:
    """Image files the boxes need that do not exist (checked before a run starts)."""
    return [p for p in box_set.image_paths.values() if not os.path.isfile(p)]


class ImageError(UserError, OSError):
    """An image that cannot be read or decoded; the message names the file."""


class TransientImageError(ImageError):
    """A read error that outlasted the retries but says nothing about the file (a flaky disk or
    network mount, too many open files): unlike a missing or corrupt image, it may pass, so the
    boxes of that image may be retried (``--resume``)."""


#: errno values of a read that may succeed if tried again: I/O error, stale NFS handle,
#: too many open files (process, system), resource busy, interrupted call.
TRANSIENT_READ_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.EMFILE, errno.ENFILE, errno.EAGAIN,
                                   errno.EINTR})


def _read_image_bytes(path: str, attempts: int, backoff_s: float) -> bytes:
    """The file's bytes; a transient error is retried with a doubling backoff, then TransientImageError."""
    for attempt in range(attempts):
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            if e.errno not in TRANSIENT_READ_ERRNOS:
                raise ImageError(f"{path}: image cannot be read ({e.strerror})") from None
            if attempt + 1 >= attempts:
                raise TransientImageError(
                    f"{path}: image cannot be read ({e.strerror}, {attempts} attempts); the error may pass: "
                    "its boxes may be retried (--resume)") from None
            time.sleep(backoff_s * 2 ** attempt)
    raise ValueError(f"attempts must be >= 1, got {attempts}")


def read_rgb(path: str, attempts: int = 4, backoff_s: float = 0.05) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]``: ``read_bgr``, then to RGB (the pose stage's crops are cut from RGB)."""
    return cv2.cvtColor(read_bgr(path, attempts, backoff_s), cv2.COLOR_BGR2RGB)


def read_bgr(path: str, attempts: int = 4, backoff_s: float = 0.05) -> np.ndarray:
    """BGR uint8 ``[H, W, 3]``: OpenCV's decode (EXIF applied, grey -> 3 channels), checked.

    The file is read once, here, and decoded from memory (``cv2.imdecode`` decodes as
    ``cv2.imread`` does, EXIF orientation included), so that a read error is seen with
    its errno: transient ones (``TRANSIENT_READ_ERRNOS``) are tried ``attempts`` times,
    ``backoff_s`` doubling between tries (0.35 s in all by default), then raise
    ``TransientImageError``; any other failure raises ``ImageError``.
    """
    return decode_bgr(_read_image_bytes(path, attempts, backoff_s), path)


def decode_rgb(data: bytes, path: str) -> np.ndarray:
    """``read_rgb`` of a file's bytes read elsewhere (shipped in a shard); ``path`` names it in errors."""
    return cv2.cvtColor(decode_bgr(data, path), cv2.COLOR_BGR2RGB)


def decode_bgr(data: bytes, path: str) -> np.ndarray:
    """``read_bgr``'s checks and decode on a file's bytes; ``path`` names it in errors."""
    # libjpeg pads a truncated JPEG with grey and only warns; a crop of it would be
    # silently wrong. Some encoders append bytes after EOI, so look near the end.
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-4096:]:
        raise ImageError(f"{path}: truncated JPEG (no end-of-image marker)")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if bgr is None:
        raise ImageError(f"{path}: cannot be decoded as an image")
    return bgr
