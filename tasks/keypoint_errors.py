"""Where the keypoints go wrong: the keypoint error classes of the COCO analysis.

Method of M. R. Ronchi and P. Perona, "Benchmarking and Error Diagnosis in Multi-Instance
Pose Estimation", ICCV 2017, and its code, github.com/matteorr/coco-analyze
(``pycocotools/cocoanalyze.py``). Written here from its rules, not copied:

- Matching: every prediction is matched to a GT person as COCOeval matches them, greedy by
  score per image, at OKS 0.1 (coco-analyze's ``oksLocThrs``), area range [32², 1e5²],
  the 20 best-scored predictions per image. GT people without visible keypoints are never
  analysed (they may still take a match, as in COCOeval).
- Per joint j of a matched prediction: the keypoint similarity
  ``ks = exp(-d² / (2 · area · (2σ_j)²))`` is taken against joint j of every GT person in the
  image and against the left/right twin of joint j of every GT person (only GT joints with
  v > 0 count). The best of those decides (the first on ties: the matched person's own joint,
  then the other people, then the matched person's twin, then the others' twins):
  good (own joint, ks >= 0.85), jitter (own joint, 0.5 <= ks < 0.85), inversion (the matched
  person's twin joint, ks >= 0.5), swap (joint j or its twin of another person, ks >= 0.5), miss
  (best ks < 0.5). Joints the matched GT does not show (v = 0) get no class.
  coco-analyze's "good" is ks > 0.85; at exactly 0.85 it gives no class at all, here good.
- AP gain: the keypoints of one class are moved onto their GT joint (coco-analyze's
  ``opt_keypoints``, below), COCOeval runs again on the same area range and maxDets, and the
  AP after the fix minus the AP before is that class's gain (coco-analyze's "AP improvement",
  ``analysisAPI/errorsAPImpact.py``). The cumulative figures fix miss, then also swap, then
  inversion, then jitter, as its precision-recall breakdown plots do.

coco-analyze's corrected position of a joint with an error: the GT joint shifted along x by
``sqrt(-2 · ln(ks) · area) · σ_j`` with ks = 0.85 for jitter, 0.5 for miss and the similarity
to the wrong joint for inversion and swap. (Its distance uses σ where the similarity uses 2σ,
so a fixed joint lands at ks^(1/4) of its GT: 0.96 for jitter, 0.84 for miss.) Kept as is, so
the gains are the ones it reports.
"""
from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from tasks.evaluation import OKS_SIGMAS, evaluator_name

KEYPOINT_NAMES = ("nose", "left_eye", "right_eye", "left_ear", "right_ear",
                  "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
                  "left_wrist", "right_wrist", "left_hip", "right_hip",
                  "left_knee", "right_knee", "left_ankle", "right_ankle")
#: Joint j's left/right twin (the nose is its own).
TWIN = np.array([0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15])
ERROR_CLASSES = ("good", "jitter", "inversion", "swap", "miss")
#: The classes coco-analyze fixes, in the order of its cumulative breakdown.
FIXABLE = ("miss", "swap", "inversion", "jitter")
GOOD_KS = 0.85
JITTER_KS = 0.5
MATCH_OKS = 0.1
AREA_RANGE = (32.0 ** 2, 1e5 ** 2)
MAX_DETS = 20
OKS_THRESHOLDS = tuple(np.round(np.linspace(0.5, 0.95, 10), 2).tolist())
SCALE = "sqrt(GT area)"
CITATION = ("M. R. Ronchi, P. Perona, Benchmarking and Error Diagnosis in Multi-Instance Pose Estimation, "
            "ICCV 2017; github.com/matteorr/coco-analyze (reimplemented)")

_NONE, _GOOD, _JITTER, _INVERSION, _SWAP, _MISS = -1, 0, 1, 2, 3, 4
_EPS = np.spacing(1)


@dataclass(frozen=True)
class GtPerson:
    """One GT annotation as the analysis reads it."""

    id: int
    xy: np.ndarray      # float64 [17, 2]
    visible: np.ndarray  # bool [17]: v > 0
    area: float
    ignore: bool        # COCOeval's: crowd, or no visible keypoint
    iscrowd: bool


@dataclass(frozen=True)
class Match:
    """A prediction (index into the results list) and the GT person COCOeval matches it to."""

    result: int
    gt_id: int
    oks: float


# ---------------------------------------------------------------- reading GT and results


def load_gt(gt: dict | str | Path) -> dict:
    """The annotation dataset: a parsed COCO keypoint file, or the path of one."""
    if isinstance(gt, dict):
        return gt
    return json.loads(Path(gt).read_text())


def gt_people_by_image(gt: dict) -> dict[int, list[GtPerson]]:
    """The person annotations of each image, in file order (COCO's order)."""
    people: dict[int, list[GtPerson]] = {int(img["id"]): [] for img in gt.get("images", [])}
    for ann in gt["annotations"]:
        k = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
        visible = k[:, 2] > 0
        crowd = bool(ann.get("iscrowd", 0))
        people.setdefault(int(ann["image_id"]), []).append(
            GtPerson(int(ann["id"]), k[:, :2], visible, float(ann["area"]),
                     crowd or ann.get("num_keypoints", int(visible.sum())) == 0, crowd))
    return people


def result_xy(result: dict) -> np.ndarray:
    """A result's joints as float64 [17, 2]."""
    return np.asarray(result["keypoints"], dtype=np.float64).reshape(-1, 3)[:, :2]


# ---------------------------------------------------------------- matching (COCOeval at OKS 0.1)


def _box_oks(dts: np.ndarray, box: Sequence[float], area: float) -> np.ndarray:
    """COCOeval's OKS against a GT with no visible joint: distance outside its box doubled."""
    var = (OKS_SIGMAS * 2) ** 2
    x0, x1 = box[0] - box[2], box[0] + box[2] * 2
    y0, y1 = box[1] - box[3], box[1] + box[3] * 2
    dx = np.maximum(0, x0 - dts[..., 0]) + np.maximum(0, dts[..., 0] - x1)
    dy = np.maximum(0, y0 - dts[..., 1]) + np.maximum(0, dts[..., 1] - y1)
    e = (dx ** 2 + dy ** 2) / var / (area + _EPS) / 2
    return np.sum(np.exp(-e), axis=1) / e.shape[1]


def image_oks(dt_xy: np.ndarray, gts: Sequence[GtPerson], boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """COCOeval's OKS ``[n, len(gts)]`` of predicted joints ``[n, 17, 2]`` against one image's GT people."""
    oks = np.zeros((len(dt_xy), len(gts)))
    for j, g in enumerate(gts):
        if g.visible.any():
            e = np.sum((dt_xy - g.xy) ** 2, axis=2) / (OKS_SIGMAS * 2) ** 2 / (g.area + _EPS) / 2
            oks[:, j] = np.sum(np.exp(-e[:, g.visible]), axis=1) / g.visible.sum()
        else:
            oks[:, j] = _box_oks(dt_xy, boxes[j], g.area)
    return oks


def match_image(dt_rows: Sequence[int], dt_scores: np.ndarray, dt_xy: np.ndarray, gts: Sequence[GtPerson],
                boxes: Sequence[Sequence[float]], threshold: float = MATCH_OKS,
                area_range: tuple[float, float] = AREA_RANGE, max_dets: int = MAX_DETS) -> list[Match]:
    """One image's greedy matching, as COCOeval's ``evaluateImg`` does it at one OKS threshold.

    ``dt_rows``: the predictions' indices in the results list, in list order (ties in score
    keep it); ``boxes``: each GT's xywh. Predictions by descending score, the first
    ``max_dets``; each takes the unmatched GT with the highest OKS >= threshold, preferring
    GT that is not ignored (ignored: crowd, no visible joint, or area outside the range).
    """
    if not len(dt_rows) or not len(gts):
        return []
    order = np.argsort(-np.asarray(dt_scores), kind="mergesort")[:max_dets]
    xy = dt_xy[order]
    ignored = np.array([g.ignore or not (area_range[0] <= g.area <= area_range[1]) for g in gts])
    gt_order = np.argsort(ignored, kind="mergesort")
    oks = image_oks(xy, gts, boxes)
    taken = np.zeros(len(gts), dtype=bool)
    matches = []
    for d in range(len(order)):
        best, m = min(threshold, 1 - 1e-10), -1
        for j in gt_order:
            if taken[j] and not gts[j].iscrowd:
                continue
            if m > -1 and not ignored[m] and ignored[j]:
                break  # GT that counts is ahead of ignored GT: an ignored one never takes over
            if oks[d, j] < best:
                continue
            best, m = oks[d, j], j
        if m > -1:
            taken[m] = True
            matches.append(Match(int(dt_rows[order[d]]), gts[m].id, float(best)))
    return matches


def match_predictions(gt: dict, results: Sequence[dict], threshold: float = MATCH_OKS,
                      area_range: tuple[float, float] = AREA_RANGE, max_dets: int = MAX_DETS) -> list[Match]:
    """Every prediction COCOeval matches to a GT person at ``threshold``, image by image."""
    people = gt_people_by_image(gt)
    boxes = {int(a["id"]): a.get("bbox", [0, 0, 0, 0]) for a in gt["annotations"]}
    rows_by_image: dict[int, list[int]] = {}
    for i, r in enumerate(results):
        rows_by_image.setdefault(int(r["image_id"]), []).append(i)
    matches: list[Match] = []
    for image_id, rows in rows_by_image.items():
        gts = people.get(image_id, [])
        xy = np.stack([result_xy(results[i]) for i in rows])
        scores = np.array([results[i]["score"] for i in rows], dtype=np.float64)
        matches += match_image(rows, scores, xy, gts, [boxes[g.id] for g in gts], threshold, area_range,
                               max_dets)
    return matches


# ---------------------------------------------------------------- error classes


def candidate_similarities(dt_xy: np.ndarray, matched: GtPerson, others: Sequence[GtPerson]) -> np.ndarray:
    """ks of each predicted joint against every candidate GT joint: ``[2 * (1 + len(others)), 17]``.

    Rows: the matched person, the other people (file order), then the same people's twin
    joints in the same order. -1 where the GT joint is not visible, so it never wins.
    """
    people = [matched, *others]
    xy = np.stack([p.xy for p in people] + [p.xy[TWIN] for p in people])
    visible = np.stack([p.visible for p in people] + [p.visible[TWIN] for p in people])
    areas = np.array([p.area for p in people] * 2)
    d2 = np.sum((xy - dt_xy[None]) ** 2, axis=2)
    ks = np.exp(-d2 / (OKS_SIGMAS * 2) ** 2 / (areas[:, None] + _EPS) / 2)
    return np.where(visible, ks, -1.0)


def classify_joints(ks: np.ndarray, matched_visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class code per joint (``ERROR_CLASSES`` index, -1 for a joint the GT does not show) and the best ks.

    ``ks``: ``candidate_similarities``' rows; row 0 is the matched person, row n/2 its twins.
    """
    n = len(ks) // 2
    best = np.maximum(ks.max(axis=0), 0.0)
    where = ks.argmax(axis=0)  # the first maximum: the matched person's own joint wins ties
    classes = np.full(ks.shape[1], _MISS)
    near = best >= JITTER_KS
    classes[near & (where == 0) & (best >= GOOD_KS)] = _GOOD
    classes[near & (where == 0) & (best < GOOD_KS)] = _JITTER
    classes[near & (where == n)] = _INVERSION
    classes[near & (where != 0) & (where != n)] = _SWAP
    classes[~matched_visible] = _NONE
    return classes, best


def corrected_xy(dt_xy: np.ndarray, gt: GtPerson, classes: np.ndarray, best_ks: np.ndarray) -> np.ndarray:
    """coco-analyze's fixed position of every joint with an error (others unchanged): see the module doc."""
    ks = np.select([classes == _JITTER, classes == _MISS], [GOOD_KS, JITTER_KS], best_ks)
    ks = np.clip(ks, _EPS, 1 - _EPS)  # its rounding: log(0) and a shift of exactly 0 avoided
    shift = np.sqrt(-np.log(ks) * 2 * gt.area * OKS_SIGMAS ** 2)
    fixed = gt.xy.copy()
    fixed[:, 0] += shift
    wrong = (classes != _NONE) & (classes != _GOOD)
    return np.where(wrong[:, None], fixed, dt_xy)


@dataclass(frozen=True)
class JointErrors:
    """The analysis of one matched prediction."""

    match: Match
    classes: np.ndarray     # int [17]: ERROR_CLASSES index, -1 where the GT joint is not visible
    error_px: np.ndarray    # float [17]: distance to the matched GT joint, NaN where not visible
    scale: float            # sqrt of the GT area
    fixed_xy: np.ndarray    # float [17, 2]: coco-analyze's corrected joints


def joint_errors(gt: dict, results: Sequence[dict], matches: Sequence[Match] | None = None) -> list[JointErrors]:
    """The class of every joint of every matched prediction whose GT shows keypoints."""
    matches = match_predictions(gt, results) if matches is None else matches
    people = gt_people_by_image(gt)
    by_id = {g.id: (image_id, g) for image_id, gs in people.items() for g in gs}
    out = []
    for m in matches:
        image_id, g = by_id[m.gt_id]
        if not g.visible.any():
            continue  # coco-analyze: a GT without keypoints cannot be analysed
        xy = result_xy(results[m.result])
        others = [p for p in people[image_id] if p.id != g.id]
        classes, best = classify_joints(candidate_similarities(xy, g, others), g.visible)
        error = np.where(g.visible, np.linalg.norm(xy - g.xy, axis=1), np.nan)
        out.append(JointErrors(m, classes, error, float(np.sqrt(g.area)), corrected_xy(xy, g, classes, best)))
    return out


# ---------------------------------------------------------------- AP after fixing a class


def _evaluator(name: str):
    """(COCO, COCOeval, options) of the evaluator ``name``."""
    if name == "faster-coco-eval":
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
        return COCO, COCOeval, {"print_function": lambda *args: None}
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    return COCO, COCOeval, {}


class _Evaluation:
    """One COCOeval on coco-analyze's parameters whose predictions' joints can be replaced."""

    def __init__(self, gt: dict, results: Sequence[dict], evaluator: str) -> None:
        self.name = evaluator_name(evaluator)
        coco, cocoeval, options = _evaluator(self.name)
        with contextlib.redirect_stdout(io.StringIO()):
            self.gt = coco()
            # COCOeval marks the GT dicts it reads (ignore flags): it gets copies, the caller's stay as they were.
            self.gt.dataset = dict(gt, annotations=[dict(a) for a in gt["annotations"]])
            self.gt.createIndex()
            # loadRes numbers results 1..n in list order and sets their area once: a fixed joint
            # does not change which unmatched predictions fall outside the area range, as in coco-analyze.
            self.dt = self.gt.loadRes([dict(r) for r in results])
        self.original = {i: list(results[i]["keypoints"]) for i in range(len(results))}
        self.ev = cocoeval(self.gt, self.dt, "keypoints", **options)
        self.ev.params.areaRng = [list(AREA_RANGE)]
        self.ev.params.areaRngLbl = ["all"]
        self.ev.params.maxDets = [MAX_DETS]
        self.ev.params.iouThrs = np.array(OKS_THRESHOLDS)

    def ap(self, fixed: dict[int, list[float]]) -> tuple[float, list[float]]:
        """AP over the OKS thresholds and per threshold, with the results ``fixed`` (index: keypoints)."""
        for i, kpts in fixed.items():
            self.dt.anns[i + 1]["keypoints"] = kpts
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.ev.evaluate()
                self.ev.accumulate()
            precision = np.asarray(self.ev.eval["precision"])[:, :, 0, 0, 0]  # [T, R]
        finally:
            for i in fixed:
                self.dt.anns[i + 1]["keypoints"] = self.original[i]
        # coco-analyze's per-threshold area under the curve, then their mean.
        per_oks = [float(np.mean(p[p > -1])) if (p > -1).any() else -1.0 for p in precision]
        return float(np.mean(per_oks)), per_oks


def _fixed_keypoints(results: Sequence[dict], analysed: Sequence[JointErrors], classes: Sequence[str]
                     ) -> dict[int, list[float]]:
    """Result index -> its keypoints with the joints of ``classes`` moved as coco-analyze moves them."""
    codes = [ERROR_CLASSES.index(c) for c in classes]
    fixed = {}
    for a in analysed:
        mask = np.isin(a.classes, codes)
        if not mask.any():
            continue
        k = np.asarray(results[a.match.result]["keypoints"], dtype=np.float64).reshape(-1, 3).copy()
        k[mask, :2] = a.fixed_xy[mask]
        fixed[a.match.result] = k.reshape(-1).tolist()
    return fixed


def ap_gains(gt: dict, results: Sequence[dict], analysed: Sequence[JointErrors], evaluator: str = "auto",
             cumulative: bool = True) -> dict:
    """AP before, after fixing each class alone, and (``cumulative``) after fixing miss, +swap, +inversion, +jitter.

    1 + 4 (+ 4) COCOeval runs on coco-analyze's area range [32², 1e5²] and 20 predictions per
    image, so ``baseline`` differs a little from the run's own AP (area range [0, 1e5²]).
    """
    if not results:  # nothing to evaluate (and pycocotools' loadRes cannot take an empty list)
        zeros = [0.0] * len(OKS_THRESHOLDS)
        return {"baseline": 0.0, "baseline_per_oks": zeros, "after_fix": {c: 0.0 for c in FIXABLE},
                "gain": {c: 0.0 for c in FIXABLE}, "gain_per_oks": {c: zeros for c in FIXABLE},
                "oks_thresholds": list(OKS_THRESHOLDS), "evaluator": None}
    ev = _Evaluation(gt, results, evaluator)
    baseline, baseline_per_oks = ev.ap({})
    out: dict = {"baseline": baseline, "baseline_per_oks": baseline_per_oks, "after_fix": {}, "gain": {},
                 "gain_per_oks": {}}
    for c in FIXABLE:
        ap, per_oks = ev.ap(_fixed_keypoints(results, analysed, [c]))
        out["after_fix"][c] = ap
        out["gain"][c] = ap - baseline
        out["gain_per_oks"][c] = [a - b for a, b in zip(per_oks, baseline_per_oks)]
    if cumulative:
        out["after_fix_cumulative"] = {
            "+".join(FIXABLE[:k + 1]): ev.ap(_fixed_keypoints(results, analysed, FIXABLE[:k + 1]))[0]
            for k in range(len(FIXABLE))}
    out["oks_thresholds"] = list(OKS_THRESHOLDS)
    out["evaluator"] = f"{ev.name} {metadata.version(ev.name)}"
    return out


# ---------------------------------------------------------------- analysis.json


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def joint_table(analysed: Sequence[JointErrors]) -> dict[str, dict]:
    """Per joint (COCO order): the five class counts, median error in px and over sqrt(GT area)."""
    table = {}
    for j, name in enumerate(KEYPOINT_NAMES):
        classes = np.array([a.classes[j] for a in analysed], dtype=int)
        px = [float(a.error_px[j]) for a in analysed if a.classes[j] != _NONE]
        rel = [float(a.error_px[j] / a.scale) for a in analysed if a.classes[j] != _NONE and a.scale > 0]
        row = {c: int(np.sum(classes == k)) for k, c in enumerate(ERROR_CLASSES)}
        row.update(keypoints=len(px), median_error_px=_median(px), median_error_scale=_median(rel))
        table[name] = row
    return table


def analyze_keypoint_errors(gt: dict | str | Path, results: Sequence[dict], evaluator: str = "auto",
                            with_ap: bool = True, cumulative: bool = True) -> dict:
    """analysis.json: per joint the error classes and median errors, totals, and the AP gains.

    ``gt``: the annotation file (path or parsed); ``results``: the run's COCO keypoint results
    (keypoints.json, what COCOeval is given); ``evaluator``: as ``tasks.evaluation``'s.
    ``with_ap=False`` skips the COCOeval runs (9 of them; 5 with ``cumulative=False``): they
    are nearly all the cost, 0.09 s each at 7,000 results with faster-coco-eval.
    """
    gt = load_gt(gt)
    matches = match_predictions(gt, results)
    analysed = joint_errors(gt, results, matches)
    joints = joint_table(analysed)
    out = {
        "method": CITATION,
        "params": {"match_oks": MATCH_OKS, "area_range": list(AREA_RANGE), "max_dets": MAX_DETS,
                   "good_ks": GOOD_KS, "jitter_ks": JITTER_KS, "classes": list(ERROR_CLASSES),
                   "scale": SCALE},
        "predictions": len(results),
        "matched": len(matches),
        "analysed": len(analysed),
        "totals": {c: sum(row[c] for row in joints.values()) for c in ERROR_CLASSES},
        "joints": joints,
    }
    out["totals"]["keypoints"] = sum(row["keypoints"] for row in joints.values())
    if with_ap:
        out["ap"] = ap_gains(gt, results, analysed, evaluator, cumulative)
    return out


# ---------------------------------------------------------------- runner report A B


def _difference(a, b):
    return None if a is None or b is None else b - a


def _fractions(row: dict) -> dict[str, float | None]:
    n = sum(row[c] for c in ERROR_CLASSES)
    return {c: (row[c] / n if n else None) for c in ERROR_CLASSES}


def diff_analyses(a: dict, b: dict) -> dict:
    """Per joint, ``b - a``: class counts, class fractions, median errors; and the AP figures.

    Fractions matter more than counts where the two runs matched different numbers of people.
    """
    joints = {}
    for name in KEYPOINT_NAMES:
        ra, rb = a["joints"][name], b["joints"][name]
        fa, fb = _fractions(ra), _fractions(rb)
        joints[name] = {
            **{c: rb[c] - ra[c] for c in ERROR_CLASSES},
            **{f"{c}_fraction": _difference(fa[c], fb[c]) for c in ERROR_CLASSES},
            "median_error_px": _difference(ra["median_error_px"], rb["median_error_px"]),
            "median_error_scale": _difference(ra["median_error_scale"], rb["median_error_scale"]),
        }
    out: dict = {"joints": joints, "totals": {c: b["totals"][c] - a["totals"][c] for c in ERROR_CLASSES}}
    if "ap" in a and "ap" in b:
        out["ap"] = {"baseline": b["ap"]["baseline"] - a["ap"]["baseline"],
                     "gain": {c: b["ap"]["gain"][c] - a["ap"]["gain"][c] for c in FIXABLE}}
    return out
