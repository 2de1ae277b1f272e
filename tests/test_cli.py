"""``python -m runner`` end to end, as a user runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from conftest import COCO_MINI, COCO_MINI_DETS, REPO, requires_shared
from ray_support import at_once
from tasks.dataset import load_boxes, read_rgb
from tasks.backends import open_backend
from tasks.evaluation import STAT_NAMES, pose_records, rescore_and_nms
from tasks.pipeline import keypoints_for_batch, prepare_batch


def runner(*args: str, cwd=None, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"runner failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def in_process_results(box_set, checkpoint: str, bs: int) -> list[dict]:
    """The same pipeline without Ray, batch by batch in file order."""
    backend = open_backend("torch", checkpoint, "cpu", bs, 2)
    images = {i: read_rgb(p) for i, p in box_set.image_paths.items()}
    ids, kpts, crop_boxes = [], [], []
    for start in range(0, len(box_set.boxes), bs):
        batch = prepare_batch(box_set.boxes[start:start + bs], images)
        keypoints, _ = keypoints_for_batch(backend, batch)
        ids.append(batch.box_ids); kpts.append(keypoints); crop_boxes.append(batch.crop_boxes)
    return rescore_and_nms(pose_records(box_set.boxes, np.concatenate(ids), np.concatenate(kpts),
                                        np.concatenate(crop_boxes)))


def test_synthetic_set_matches_in_process_pipeline(tmp_path, synthetic_coco, random_checkpoint, models_dir):
    out = tmp_path / "out"
    proc = runner("--dataroot", synthetic_coco["dataroot"], "--dets", synthetic_coco["dets"],
                  "--weights", random_checkpoint, "--backend", "torch", "--devices", "cpu", "--bs", "4",
                  "--out", str(out), "--models-dir", models_dir)
    written = json.loads((out / "keypoints.json").read_text())
    expected = in_process_results(load_boxes(synthetic_coco["dataroot"], synthetic_coco["dets"]), random_checkpoint, 4)
    assert written == json.loads(json.dumps(expected))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(STAT_NAMES) <= set(metrics) and metrics["results"] == len(written) and metrics["complete"]
    assert metrics["boxes"] == 18 and metrics["results_before_nms"] == 18
    assert "COCO keypoint mAP" in proc.stdout and "sum of device fps" in proc.stdout
    tp = json.loads((out / "throughput.json").read_text())
    assert tp["totals"]["crops"] == 36 and tp["devices"][0]["crops"] == 36


@requires_shared
def test_coco_mini_cpu_and_two_cpu_workers_identical(tmp_path, random_checkpoint, exported):
    """Real images on one worker and on two; the first run also checks its first 32 boxes
    against PyTorch (``--check-backend``, parity.json).

    The boxes: coco-mini's first 32 detections, then every third, 61 on all 4 images (half
    the network time of all 118). The checked 32 stay the file's first: a random network's
    heatmap on a real crop can hold two near-equal maxima, where fp32 rounding moves the
    argmax by many pixels (measured: 71.6 px on every second detection); these 32 have none.
    """
    from tasks.deploy import Variant
    from tasks.export import ExportOptions

    models = exported(tmp_path / "models", ExportOptions(variant=Variant(uint8_input=True)))  # both runs open it
    dets = tmp_path / "dets.json"
    every = json.loads(COCO_MINI_DETS.read_text())
    dets.write_text(json.dumps(every[:32] + every[32::3]))
    common = ["--dataroot", str(COCO_MINI), "--dets", str(dets), "--weights", random_checkpoint,
              "--backend", "onnxruntime", "--bs", "16", "--models-dir", str(models)]
    at_once(lambda: runner(*common, "--devices", "cpu", "--shard-size", "64", "--check-backend", "torch",
                           "--check-boxes", "32", "--out", str(tmp_path / "one")),
            lambda: runner(*common, "--devices", "cpu:2", "--shard-size", "32", "--out", str(tmp_path / "two")))
    parity = json.loads((tmp_path / "one" / "parity.json").read_text())
    assert parity["boxes"] == 32 == parity["matched"] and parity["unmatched_a"] == parity["unmatched_b"] == 0
    assert parity["max_abs_px"] < 1e-3 and parity["frac_within_1e-3px"] >= 0.995
    assert parity["verdict"] == "pass" and parity["reference_backend"] == "torch"
    one = (tmp_path / "one" / "keypoints.json").read_bytes()
    assert one == (tmp_path / "two" / "keypoints.json").read_bytes()
    tp = json.loads((tmp_path / "two" / "throughput.json").read_text())
    assert [d["id"] for d in tp["devices"]] == ["cpu:0", "cpu:1"]
    assert sum(d["crops"] for d in tp["devices"]) == 122 == tp["totals"]["crops"]
    assert all(d["boxes"] > 0 for d in tp["devices"])
    metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert metrics["boxes"] == 61 and metrics["results_before_nms"] == 61 and metrics["evaluated"]


def test_synthetic_mode_reports_throughput_only(tmp_path):
    proc = runner("--synthetic", "6", "--bs", "3", "--backend", "torch", "--out", str(tmp_path / "o"),
                  "--models-dir", str(tmp_path / "m"), cwd=tmp_path)
    assert "accuracy: n/a (no checkpoint)" in proc.stdout
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["accuracy"] == "n/a (no checkpoint)" and metrics["boxes"] == 6
    assert json.loads((tmp_path / "o" / "throughput.json").read_text())["totals"]["crops"] == 12


def test_missing_data_and_weights_is_one_line(tmp_path):
    proc = runner("--dataroot", str(tmp_path / "nope"), "--dets", "d.json", "--out", str(tmp_path / "o"),
                  cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: missing dataroot")
    assert "42808e905aa20133a89a6a2cba073265a2ce35fabe65edffd9f153ef5846b7b0" in lines[0]
    assert "162,603,012" in lines[0] and "--synthetic" in lines[0]


def test_existing_out_is_not_overwritten(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keypoints.json").write_text("[]")
    proc = runner("--synthetic", "2", "--out", str(out), "--models-dir", str(tmp_path / "m"), check=False)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    assert (out / "keypoints.json").read_text() == "[]"
