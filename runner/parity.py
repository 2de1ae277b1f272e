"""``--check-backend NAME``: does the run's backend still give the checkpoint's keypoints?

After the dispatch window closes, the first ``--check-boxes`` boxes (rounded up to whole
batches) run once more, in the driver's process and on its CPU, through a reference backend
(normally ``torch``: the checkpoint itself). Both sets are compared box by box before OKS-NMS
(``tasks.compare``), so every checked box is in both; ``OUT/parity.json`` holds the figures
and a verdict against the tolerance stated beside them.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from cluster.reducer import Merged
from runner.config import RunConfig
from runner.inputs import Inputs, prepare_model
from runner.plan import RunPlan
from runner.outputs import write_json
from tasks.backends import open_backend
from tasks.compare import compare_results
from tasks.dataset import Box, read_rgb
from tasks.evaluation import PoseColumns, pose_columns, rescore_scores
from tasks.pipeline import keypoints_for_batch, prepare_batch

#: What a verdict of "pass" needs. fp32 backends on a CPU differ from the checkpoint only in
#: summation order (measured: ~1e-5 px); an OM on an NPU runs in fp16 by ATC's default, where
#: a heatmap's argmax may move by one cell (4 px of the crop), so it is held to OKS, the
#: accuracy COCO measures, and to half a pixel for almost every joint.
TOLERANCES = {
    "fp32": {"max_abs_px": 1e-3, "frac_within_1e-3px": 0.995, "max_abs_score": 1e-4},
    "fp16": {"frac_within_0.5px": 0.95, "mean_oks": 0.99},
}


def tolerance_for(backend: str) -> tuple[str, dict]:
    """The tolerance a backend is held to: fp16 for OM, fp32 for the CPU backends."""
    name = "fp16" if backend == "om" else "fp32"
    return name, TOLERANCES[name]


def verdict(figures: dict, tolerance: dict) -> bool:
    """Every figure within its bound: ``max_*`` at most, ``frac_*`` and ``mean_*`` at least."""
    for key, bound in tolerance.items():
        value = figures.get(key)
        if value is None or (value > bound if key.startswith("max_") else value < bound):
            return False
    return True


def checked_boxes(boxes: list[Box], n: int, bs: int) -> list[Box]:
    """The first ``n`` boxes, rounded up to whole batches (the run's batches, so the same crops)."""
    return boxes[:-(-n // bs) * bs]


def reference_keypoints(cfg: RunConfig, plan: RunPlan, inputs: Inputs, reference: str, boxes: list[Box], bs: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(box ids, keypoints [n, 17, 3], crop boxes) of ``boxes`` through ``reference`` on this CPU."""
    on_cpu = replace(plan, backend=reference, gears=None, devices=(), soc_version=None)
    model_path = prepare_model(cfg, on_cpu, inputs.weights, inputs.box_set, bs)
    backend = open_backend(reference, model_path, "cpu", bs, cfg.backend.threads or os.cpu_count() or 1,
                           plan.variant)
    images = {i: read_rgb(inputs.box_set.image_paths[i]) for i in dict.fromkeys(b.image_id for b in boxes)}
    ids, kpts, crops = [], [], []
    try:
        for start in range(0, len(boxes), bs):
            batch = prepare_batch(boxes[start:start + bs], images)
            keypoints, _ = keypoints_for_batch(backend, batch, plan.flip)
            ids.append(batch.box_ids), kpts.append(keypoints), crops.append(batch.crop_boxes)
    finally:
        backend.close()
    return np.concatenate(ids), np.concatenate(kpts), np.concatenate(crops)


def rescored_records(columns: PoseColumns) -> list[dict]:
    """Every row as a result record with its rescored score, before OKS-NMS."""
    return columns.records(np.arange(len(columns)), rescore_scores(columns.keypoints[:, :, 2], columns.scores))


def check_parity(cfg: RunConfig, plan: RunPlan, inputs: Inputs, bs: int, merged: Merged, out: Path, log) -> dict:
    """Write ``OUT/parity.json`` for the run's first boxes against ``--check-backend``; log one line."""
    reference, backend = cfg.evaluation.check_backend, plan.backend
    boxes = checked_boxes(inputs.box_set.boxes, cfg.evaluation.check_boxes, bs)
    ref_ids, ref_kpts, ref_crops = reference_keypoints(cfg, plan, inputs, reference, boxes, bs)
    # The run's own results for the same boxes (a box skipped by the run is in neither).
    rows = np.flatnonzero(np.isin(merged.box_ids, ref_ids))
    ran = rescored_records(pose_columns(inputs.box_set.boxes, merged.box_ids[rows], merged.keypoints[rows],
                                        merged.crop_boxes[rows]))
    ref = rescored_records(pose_columns(inputs.box_set.boxes, ref_ids, ref_kpts, ref_crops))
    figures = compare_results(ran, ref).as_dict()
    name, tolerance = tolerance_for(backend)
    if plan.precision_mode:  # the tolerance says which OM it was held to
        name = f"{name} (ATC precision_mode {plan.precision_mode})"
    passed = verdict(figures, tolerance) and figures["unmatched_a"] == figures["unmatched_b"] == 0
    parity = {"backend": backend, "precision_mode": plan.precision_mode, "reference_backend": reference,
              "reference_device": "cpu", "boxes": len(boxes), **figures, "tolerance": {"name": name, **tolerance},
              "verdict": "pass" if passed else "fail"}
    write_json(out / "parity.json", parity)
    log(f"parity {backend} vs {reference} on {len(boxes)} boxes: {parity['verdict'].upper()} "
        f"(max {_fmt(figures['max_abs_px'])} px, {_fmt(figures['frac_within_1e-3px'])} of joints within 1e-3 px, "
        f"mean OKS {_fmt(figures['mean_oks'])}, max score diff {_fmt(figures['max_abs_score'])}; "
        f"{name} tolerance) -> {out / 'parity.json'}")
    return parity


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"
