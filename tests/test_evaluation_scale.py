"""faster-coco-eval against pycocotools at full-dataset scale (issue 17 point 3).

A seeded synthetic keypoint set shaped like COCO val2017 (5,000 images, persons of
every size, crowd and keypoint-less GT, images with no GT or more than 20 results,
score ties): both evaluators must give the same 10 stats to 1e-9. The time each
takes is measured by a benchmark outside the suite, not here: a timed test on shared
cores would fail for reasons of its own.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tasks.evaluation import STAT_NAMES, evaluate_keypoints
from tasks.synthetic import KEYPOINT_NAMES, SKELETON, _POSE

pytest.importorskip("faster_coco_eval", reason="faster-coco-eval is not installed (pip install -r requirements.txt)")

N_JOINTS = len(KEYPOINT_NAMES)


def write_keypoint_eval_set(root: Path, n_results: int, seed: int = 0, n_images: int = 5000,
                            max_persons: int = 6, empty_images: float = 0.4,
                            image_hw: tuple[int, int] = (480, 640)) -> tuple[str, list[dict]]:
    """A COCO keypoint annotation file (no images: COCOeval reads none) and ``n_results`` results on it.

    Images hold 0 to ``max_persons`` GT persons, none for a fraction ``empty_images``
    of them (defaults: about 9,000 persons on 5,000 images, as val2017's 11,004).
    Returns the annotation file and the results list, as ``keypoints.json`` holds it.
    """
    rng = np.random.default_rng(seed)
    h, w = image_hw
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w} for i in range(1, n_images + 1)]
    persons = rng.integers(0, max_persons + 1, n_images)
    persons[rng.random(n_images) < empty_images] = 0  # val2017: about half the images hold no person
    annotations, gt_by_image = [], {}
    for image_id, n in zip(range(1, n_images + 1), persons.tolist()):
        for _ in range(n):
            # Log-uniform heights put persons in all of COCOeval's area ranges (< 32^2, 32^2-96^2, > 96^2).
            bh = float(np.exp(rng.uniform(np.log(12), np.log(0.95 * h))))
            bw = bh * float(rng.uniform(0.3, 0.7))
            x, y = float(rng.uniform(-0.1 * bw, w - 0.9 * bw)), float(rng.uniform(-0.1 * bh, h - 0.9 * bh))
            pts = np.stack([x + (_POSE[:, 0] + rng.normal(0, 0.03, N_JOINTS)) * bw,
                            y + (_POSE[:, 1] + rng.normal(0, 0.03, N_JOINTS)) * bh], axis=1)
            vis = rng.choice([0, 1, 2], N_JOINTS, p=[0.3, 0.1, 0.6])
            if rng.random() < 0.1:
                vis[:] = 0  # COCOeval ignores persons without keypoints, but they still match
            kps = np.concatenate([np.where(vis[:, None] > 0, pts.round(2), 0.0), vis[:, None]], axis=1)
            crowd = int(rng.random() < 0.02)
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": crowd,
                   "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
                   "area": round(bw * bh * float(rng.uniform(0.4, 0.7)), 2),
                   "num_keypoints": int((vis > 0).sum()), "keypoints": kps.reshape(-1).tolist(),
                   "segmentation": []}
            annotations.append(ann)
            gt_by_image.setdefault(image_id, []).append(pts)
    # Results per image: proportional to its persons plus clutter, so some images get none
    # and some more than maxDets = 20.
    weight = (persons + 0.3) * rng.gamma(1.0, 1.0, n_images)
    counts = rng.multinomial(n_results, weight / weight.sum())
    tie_scores = np.float32([0.5, 0.25, 0.125, 0.75])
    results = []
    for image_id, n in zip(range(1, n_images + 1), counts.tolist()):
        people = gt_by_image.get(image_id, [])
        for _ in range(n):
            if people and rng.random() < 0.85:
                pts = people[rng.integers(len(people))]
                size = float(np.ptp(pts[:, 1])) + 1.0
                # Errors from a fraction of a joint's sigma to far off: OKS over the whole 0.5-0.95 range.
                pts = pts + rng.normal(0, size * float(rng.exponential(0.04)), pts.shape)
            else:
                bh = float(rng.uniform(10, h / 2))
                pts = np.stack([rng.uniform(0, w) + (_POSE[:, 0] - 0.5) * bh * 0.5,
                                rng.uniform(0, h) + (_POSE[:, 1] - 0.5) * bh], axis=1)
            u = rng.random()
            # Ties as the pipeline makes them: many 0 scores (no joint > 0.2), some repeated values.
            score = 0.0 if u < 0.1 else float(rng.choice(tie_scores)) if u < 0.2 else float(np.float32(rng.random()))
            kp_scores = rng.random(N_JOINTS)
            kps = np.concatenate([pts, kp_scores[:, None]], axis=1).astype(np.float32)
            results.append({"image_id": image_id, "category_id": 1, "score": score,
                            "keypoints": [float(v) for v in kps.reshape(-1)]})
    coco = {"info": {"description": "synthetic keypoint evaluation set", "seed": seed}, "licenses": [],
            "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "person", "supercategory": "person",
                            "keypoints": KEYPOINT_NAMES, "skeleton": SKELETON}]}
    root.mkdir(parents=True, exist_ok=True)
    ann_file = root / "person_keypoints_synthetic.json"
    ann_file.write_text(json.dumps(coco))
    return str(ann_file), results


def _shape_of(ann_file: str, results: list[dict]) -> dict:
    """What the set holds that could make two evaluators disagree."""
    ann = json.loads(Path(ann_file).read_text())
    per_image = np.bincount([r["image_id"] for r in results], minlength=len(ann["images"]) + 1)[1:]
    scores = np.array([r["score"] for r in results])
    areas = np.array([a["area"] for a in ann["annotations"] if a["num_keypoints"] > 0])
    return {"results": len(results), "images without results": int((per_image == 0).sum()),
            "images over maxDets": int((per_image > 20).sum()), "zero scores": int((scores == 0).sum()),
            "tied scores": len(scores) - len(np.unique(scores)),
            "crowd": sum(a["iscrowd"] for a in ann["annotations"]),
            "no keypoints": sum(a["num_keypoints"] == 0 for a in ann["annotations"]),
            "medium": int(((areas >= 32 ** 2) & (areas < 96 ** 2)).sum()), "large": int((areas >= 96 ** 2).sum()),
            "small": int((areas < 32 ** 2).sum())}


def _both(ann_file: str, results: list[dict]) -> tuple[dict, dict]:
    return (evaluate_keypoints(ann_file, results, "faster-coco-eval"),
            evaluate_keypoints(ann_file, results, "pycocotools"))


@pytest.mark.parametrize("seed, n_results, n_images, max_persons", [
    (11, 3000, 150, 6), (12, 3000, 100, 15), (13, 1500, 300, 2)])
def test_small_synthetic_sets_give_pycocotools_stats(tmp_path, seed, n_results, n_images, max_persons):
    ann_file, results = write_keypoint_eval_set(tmp_path, n_results, seed, n_images, max_persons)
    fast, slow = _both(ann_file, results)
    assert max(abs(fast[n] - slow[n]) for n in STAT_NAMES) <= 1e-9, (fast, slow)
    assert 0.02 < slow["AP"] < 0.98 and 0.02 < slow["AR"] < 0.98


def test_100000_results_give_pycocotools_stats(tmp_path):
    ann_file, results = write_keypoint_eval_set(tmp_path, 100_000, seed=1)
    shape = _shape_of(ann_file, results)
    assert shape["results"] == 100_000
    assert min(shape.values()) > 0, shape  # every case is present
    fast, slow = _both(ann_file, results)
    assert fast["evaluator"].startswith("faster-coco-eval ") and slow["evaluator"].startswith("pycocotools ")
    assert max(abs(fast[n] - slow[n]) for n in STAT_NAMES) <= 1e-9, (fast, slow)
    assert 0.1 < slow["AP"] < 0.9 and 0.1 < slow["AR"] < 0.9
