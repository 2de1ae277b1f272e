"""Result records, rescoring, OKS-NMS and COCOeval (docs/numerics.md#records,
docs/numerics.md#rescoring, docs/numerics.md#oks-nms, docs/numerics.md#evaluation).

``results`` are COCO keypoint result dicts. ``keypoints.json`` holds exactly the
list that ``evaluate_keypoints`` is given.

Records are built, rescored and suppressed column-wise (numpy arrays, one row per
box), because a full-dataset run has 100,000 of them; the per-record functions
(``result_record``, ``rescore``, ``oks_nms_indices``) state the rules one record or
one image at a time and give the same numbers bit for bit.
"""
from __future__ import annotations

import contextlib
import gc
import io
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import NamedTuple

import numpy as np

from tasks.dataset import Box
from tasks.errors import UserError

#: COCO keypoint sigmas, also used by OKS-NMS (docs/numerics.md#oks-nms).
OKS_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62,
                       1.07, 1.07, .87, .87, .89, .89]) / 10.0
RESCORE_THRESHOLD = 0.2
NMS_THRESHOLD = 0.9
STAT_NAMES = ("AP", "AP .5", "AP .75", "AP (M)", "AP (L)",
              "AR", "AR .5", "AR .75", "AR (M)", "AR (L)")
#: ``auto``: faster-coco-eval when it is installed, else pycocotools. faster-coco-eval runs
#: COCOeval's matching and accumulation in C++ (3-4x less time at 100,000 results); the tests
#: hold its 10 stats to pycocotools' within 1e-9 on coco-mini's reference results, the
#: GT-heatmap runs (coco-mini, subset79, synthetic) and synthetic sets up to 100,000 results.
EVALUATORS = ("auto", "faster-coco-eval", "pycocotools")


class EvaluatorError(UserError, ValueError):
    """The evaluator asked for is unknown or not installed; the message is one line."""


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic collector off while millions of acyclic containers are made.

    Every young-generation collection walks what was made since the last one and the
    full ones walk the heap: 100,000 result dicts took 0.9-1.6 s with it on, 0.17 s
    off. Reference counting still frees everything; the collector's state is restored.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# ---------------------------------------------------------------- records (docs/numerics.md#records)


@dataclass(frozen=True)
class PoseColumns:
    """Pose results before NMS, one row per computed box: ``result_record``'s fields as arrays."""

    image_ids: np.ndarray  # int64 [n]
    bboxes: np.ndarray     # float32 [n, 4]: the detection's xywh (not the crop box)
    areas: np.ndarray      # float64 [n]: crop-box area, for OKS-NMS only
    scores: np.ndarray     # float32 [n]: the detection score (rescoring replaces it)
    keypoints: np.ndarray  # float32 [n, 17, 3]

    def __len__(self) -> int:
        return len(self.image_ids)

    def records(self, rows: np.ndarray | None = None, scores: np.ndarray | None = None) -> list[dict]:
        """Result dicts for ``rows`` (default: all, in order), with ``scores`` in place of the box scores.

        Keys and values as ``result_record`` gives them: ``tolist`` turns float32 into the
        same Python floats as ``float(np.float32(v))``, for whole columns at once.
        """
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        score_list = (self.scores[rows] if scores is None else np.asarray(scores, dtype=np.float64)).tolist()
        with _gc_paused():
            return [{"bbox": b, "image_id": i, "area": a, "score": s, "category_id": 1, "keypoints": k}
                    for b, i, a, s, k in zip(self.bboxes[rows].tolist(), self.image_ids[rows].tolist(),
                                             self.areas[rows].tolist(), score_list,
                                             self.keypoints[rows].reshape(len(rows), -1 if len(rows) else 0).tolist())]


def pose_columns(boxes: list[Box], box_ids: np.ndarray, keypoints: np.ndarray,
                 crop_boxes: np.ndarray) -> PoseColumns:
    """``PoseColumns`` for computed boxes, in the order of ``box_ids`` (ids of ``boxes``)."""
    box_ids = np.asarray(box_ids, dtype=np.int64).reshape(-1)
    ids = np.fromiter((b.id for b in boxes), np.int64, len(boxes))
    by_id = np.argsort(ids, kind="stable")
    at = np.searchsorted(ids[by_id], box_ids)
    found = at < len(ids)
    found[found] = ids[by_id[at[found]]] == box_ids[found]
    if not found.all():
        raise KeyError(f"box ids not among the boxes: {box_ids[~found][:5].tolist()}")
    rows = by_id[at]
    image_ids = np.fromiter((b.image_id for b in boxes), np.int64, len(boxes))[rows]
    xywh = np.array([b.xywh for b in boxes], dtype=np.float64).reshape(-1, 4)[rows]
    box_scores = np.fromiter((b.score for b in boxes), np.float64, len(boxes))[rows]
    # crop_area's float64 arithmetic on the float32 corners, for every row at once.
    c = np.asarray(crop_boxes, dtype=np.float32).reshape(-1, 4).astype(np.float64)
    areas = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
    kpts = np.asarray(keypoints, dtype=np.float32).reshape(len(box_ids), len(OKS_SIGMAS), 3)
    return PoseColumns(image_ids, xywh.astype(np.float32), areas, box_scores.astype(np.float32), kpts)


# ---------------------------------------------------------------- rescoring and OKS-NMS (docs/numerics.md#oks-nms)


def rescore_scores(keypoint_scores: np.ndarray, box_scores: np.ndarray) -> np.ndarray:
    """``rescore`` for every row: float64 ``[n]`` from ``[n, 17]`` joint scores and ``[n]`` box scores.

    The confident scores are summed one joint at a time, in joint order, as Python's
    ``sum`` does. For float32 scores any order is exact; for float64 ones (records
    made elsewhere) numpy's pairwise ``sum`` would differ in the last bit.
    """
    s = np.asarray(keypoint_scores, dtype=np.float64)
    confident = s > RESCORE_THRESHOLD
    total = np.zeros(len(s))
    for j in range(s.shape[1]):
        total = total + np.where(confident[:, j], s[:, j], 0.0)  # x + 0.0 == x: skipped joints add nothing
    count = confident.sum(axis=1)
    kpt_score = np.divide(total, count, out=np.zeros(len(s)), where=count > 0)
    return kpt_score * np.asarray(box_scores, dtype=np.float64)


def _image_groups(image_ids: np.ndarray) -> list[np.ndarray]:
    """Row indices per image, images in order of first appearance, rows in input order."""
    _, first, inverse = np.unique(image_ids, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    group = rank[inverse.reshape(-1)]
    rows = np.argsort(group, kind="stable")
    return np.split(rows, np.flatnonzero(np.diff(group[rows])) + 1) if len(rows) else []


#: Joints that bound OKS from above before all 17 are computed (nose, a shoulder, a hip, an ankle).
_PROBE = np.array([0, 6, 11, 16])
#: Pairs of candidates per OKS block: small enough for the temporaries to stay in cache.
_PAIR_CHUNK = 1 << 13


class _Candidates(NamedTuple):
    """What OKS-NMS reads of each row, as contiguous float64 arrays."""

    x: np.ndarray        # [n, 17]
    y: np.ndarray        # [n, 17]
    probe_x: np.ndarray  # [n, 4]: x[:, _PROBE]
    probe_y: np.ndarray  # [n, 4]
    areas: np.ndarray    # [n]: crop-box areas
    bounded: np.ndarray  # bool [n]: finite coordinates and area >= 0


def _suppressed(ri: np.ndarray, rj: np.ndarray, c: _Candidates, threshold: float) -> np.ndarray:
    """``not (OKS(i, j) <= threshold)`` for pairs of rows, decided as ``oks_nms_indices`` does.

    OKS is computed with ``oks_one_to_many``'s element-wise operations and 17-term
    reduction, so each comparison is bit for bit. Most pairs are two different people,
    far apart: since ``sum_k (1 - exp(-e_k)) = 17 (1 - OKS)`` and every term is in [0, 1],
    4 joints whose terms already pass ``17 (1 - threshold)`` (plus 1e-6, far above the
    float error of 1e-14) prove ``OKS < threshold`` without the other 13. ``bounded``:
    rows with finite coordinates and area >= 0, for which every term is in [0, 1].
    """
    var = (OKS_SIGMAS * 2) ** 2
    s = (c.areas[ri] + c.areas[rj]) / 2 + np.spacing(1)
    dx = c.probe_x[rj] - c.probe_x[ri]
    dy = c.probe_y[rj] - c.probe_y[ri]
    loss = np.sum(1.0 - np.exp(-((dx ** 2 + dy ** 2) / var[_PROBE] / s[:, None] / 2)), axis=1)
    near = ~(loss > len(var) * (1.0 - threshold) + 1e-6) | ~(c.bounded[ri] & c.bounded[rj])
    out = np.zeros(len(ri), dtype=bool)
    ri, rj, s = ri[near], rj[near], s[near]
    dx = c.x[rj] - c.x[ri]
    dy = c.y[rj] - c.y[ri]
    e = (dx ** 2 + dy ** 2) / var / s[:, None] / 2
    out[near] = ~(np.sum(np.exp(-e), axis=1) / e.shape[1] <= threshold)  # NaN suppresses
    return out


def _greedy_nms(orders: list[np.ndarray], candidates: _Candidates, threshold: float) -> list[np.ndarray]:
    """Greedy OKS-NMS of many images at once; ``orders`` are rows by descending score per image.

    ``oks_nms_indices`` keeps candidate j unless an earlier kept candidate i has
    ``not (OKS(i, j) <= threshold)``. So: that test for every pair i < j of an image,
    then one pass over the positions, for all images side by side.
    """
    sizes = np.array([len(o) for o in orders])
    m = int(sizes.max())
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = np.concatenate(orders)
    # [g, p]: the row at position p of image g; past its end it repeats its last row (never alive).
    pad = flat[starts[:, None] + np.minimum(np.arange(m)[None, :], sizes[:, None] - 1)]
    ti, tj = np.triu_indices(m, 1)
    gi, pair = np.nonzero(tj[None, :] < sizes[:, None])  # pairs of each image's own candidates
    pi, pj = ti[pair], tj[pair]
    suppress = np.zeros((len(orders), m, m), dtype=bool)
    for c in range(0, len(gi), _PAIR_CHUNK):
        g, i, j = gi[c:c + _PAIR_CHUNK], pi[c:c + _PAIR_CHUNK], pj[c:c + _PAIR_CHUNK]
        suppress[g, i, j] = _suppressed(pad[g, i], pad[g, j], candidates, threshold)
    alive = np.arange(m)[None, :] < sizes[:, None]
    for p in range(m):  # alive[:, p] is final once every earlier position is decided
        alive[:, p + 1:] &= ~(suppress[:, p, p + 1:] & alive[:, p:p + 1])
    return [pad[g, alive[g]] for g in range(len(orders))]


#: Images with more candidates than this go through oks_nms_indices' loop alone: the
#: pairwise matrix would grow with the square of their count.
_MAX_BATCHED = 2048


def _greedy_nms_one(order: np.ndarray, candidates: _Candidates, threshold: float) -> np.ndarray:
    """Greedy OKS-NMS of one large image, pick by pick: the same pairwise rule (``_suppressed``)
    without ``_greedy_nms``'s matrix, which would grow with the square of its candidates."""
    picks = []
    while len(order):
        picks.append(order[0])
        rest = order[1:]
        order = rest[~_suppressed(np.full(len(rest), order[0]), rest, candidates, threshold)]
    return np.array(picks, dtype=np.int64)


def nms_rows(image_ids: np.ndarray, box_scores: np.ndarray, keypoints: np.ndarray, areas: np.ndarray,
             threshold: float = NMS_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Rescoring then OKS-NMS per image (docs/numerics.md#oks-nms), as ``rescore_and_nms``, on columns.

    ``image_ids`` ``[n]``, ``box_scores`` ``[n]``, ``keypoints`` ``[n, 17, 3]``, ``areas``
    ``[n]`` (crop boxes). Returns the rows kept, in output order (images in
    first-appearance order, each in pick order), and their new scores.
    """
    kpts = np.asarray(keypoints, dtype=np.float64).reshape(len(image_ids), len(OKS_SIGMAS), 3)
    areas = np.asarray(areas, dtype=np.float64).reshape(-1)
    scores = rescore_scores(kpts[:, :, 2], box_scores)
    if not len(scores):
        return np.zeros(0, dtype=np.int64), scores
    groups = _image_groups(np.asarray(image_ids).reshape(-1))
    # One argsort per image on that image's scores, as oks_nms_indices does: an unstable
    # sort orders ties by the array it is given, so one global sort would not (trap T12).
    orders = [g[scores[g].argsort()[::-1]] for g in groups]
    sizes = np.array([len(o) for o in orders])
    kept: list[np.ndarray] = [o for o in orders]  # images of one candidate keep it
    x, y = np.ascontiguousarray(kpts[:, :, 0]), np.ascontiguousarray(kpts[:, :, 1])
    candidates = _Candidates(x, y, np.ascontiguousarray(x[:, _PROBE]), np.ascontiguousarray(y[:, _PROBE]), areas,
                             np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1) & (areas >= 0)
                             & np.isfinite(areas))
    # Images in bands of similar size (2^(k-1) < n <= 2^k), so that the padded [m, m]
    # matrix of each is at most 4x its n^2, and at most 2^24 matrix cells at a time.
    band = np.ceil(np.log2(np.maximum(sizes, 1))).astype(int)
    for b in np.unique(band[(sizes > 1) & (sizes <= _MAX_BATCHED)]):
        members = np.flatnonzero((band == b) & (sizes > 1))
        step = max(1, (1 << 24) >> (2 * int(b)))
        for start in range(0, len(members), step):
            batch = members[start:start + step]
            for g, rows in zip(batch, _greedy_nms([orders[g] for g in batch], candidates, threshold)):
                kept[g] = rows
    for g in np.flatnonzero(sizes > _MAX_BATCHED):
        kept[g] = _greedy_nms_one(orders[g], candidates, threshold)
    rows = np.concatenate(kept)
    return rows, scores[rows]


# ---------------------------------------------------------------- COCOeval (docs/numerics.md#evaluation)


def evaluator_name(evaluator: str = "auto") -> str:
    """The evaluator that runs for ``evaluator``: ``auto`` is faster-coco-eval when importable."""
    if evaluator not in EVALUATORS:
        raise EvaluatorError(f"evaluator {evaluator!r} is unknown; use one of {', '.join(EVALUATORS)}")
    if evaluator == "pycocotools":
        return evaluator
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        if evaluator == "auto":
            return "pycocotools"
        raise EvaluatorError("evaluator faster-coco-eval is not installed: pip install -r requirements.txt, "
                             "or use --evaluator pycocotools") from None
    return "faster-coco-eval"


def evaluate_keypoints(ann_file: str, results: list[dict], evaluator: str = "auto") -> dict[str, float | str]:
    """COCOeval 'keypoints' with default params; the 10 stats by name and ``evaluator``.

    ``evaluator``: one of ``EVALUATORS``; ``"evaluator"`` in the result names the one
    that ran and its version, e.g. ``"faster-coco-eval 1.8.0"``. Evaluates over every
    image of the annotation file. The evaluators' progress output is captured.
    """
    name = evaluator_name(evaluator)
    if name == "faster-coco-eval":
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
        options = {"print_function": lambda *args: None}
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        options = {}
    stats = np.zeros(len(STAT_NAMES))
    if results:
        with contextlib.redirect_stdout(io.StringIO()), _gc_paused():
            gt = COCO(ann_file)
            # loadRes sets id, area and bbox on the dicts it is given, nothing deeper: a
            # shallow copy keeps the caller's list as it was (a deepcopy costs seconds at 100k).
            dt = gt.loadRes([dict(r) for r in results])
            ev = COCOeval(gt, dt, "keypoints", **options)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = np.asarray(ev.stats[:len(STAT_NAMES)], dtype=np.float64)  # keypoints: exactly these 10
    out: dict[str, float | str] = {n: float(v) for n, v in zip(STAT_NAMES, stats)}
    out["evaluator"] = f"{name} {metadata.version(name)}"
    return out
