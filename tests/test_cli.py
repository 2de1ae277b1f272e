"""``python -m runner`` end to end, as a user runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import COCO_MINI, COCO_MINI_DETS, REPO, requires_shared
from ray_support import at_once
from tasks.dataset import load_boxes, read_rgb
from tasks.backends import open_backend
from reference_evaluation import pose_records, rescore_and_nms
from tasks.evaluation import STAT_NAMES
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
    from tasks.variant import Variant
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
    check_report(tmp_path / "two", boxes=61)
    assert "<h2>Parity</h2>" in (tmp_path / "one" / "report.html").read_text()  # --check-backend ran there
    check_show(tmp_path / "two", tmp_path / "shown")


def check_report(out, boxes: int) -> None:
    """timeline.json, analysis.json and report.html of a finished evaluated run (issue 28's acceptance)."""
    from tasks.keypoint_errors import ERROR_CLASSES, KEYPOINT_NAMES
    from tasks.timeline import track_name, winning_boxes
    from test_report_page import open_in_chromium

    read = lambda name: json.loads((out / name).read_text())  # noqa: E731
    devices, metrics, run = read("devices.json"), read("metrics.json"), read("run.json")
    tracks = [track_name(d["device"], d["node"]) for d in devices]
    assert [d["device"] for d in devices] == ["cpu:0", "cpu:1"]
    trace = read("timeline.json")
    names = [e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "process_name"]
    assert names[:2] == tracks and set(names[2:]) <= {"run"}  # a track per device; "run" holds the queue's markers
    shards = [e for e in trace["traceEvents"] if e.get("cat") == "shard"]
    assert all(e["ph"] == "X" and {"shard", "boxes", "copy", "won"} <= set(e["args"]) for e in shards)
    assert winning_boxes(trace) == boxes == sum(e["args"]["boxes"] for e in shards if e["args"]["won"])
    ids = sorted(e["args"]["shard"] for e in shards if e["args"]["won"])
    assert ids == list(range(len(ids))) and {e["args"]["shard"] for e in shards} == set(ids)  # each kept once
    calls = [e for e in trace["traceEvents"] if e.get("cat") == "call"]
    assert len(calls) == sum(d["call_ms"]["n"] for d in read("throughput.json")["devices"]) > 0
    assert any(e.get("ph") == "i" and e["args"]["kind"] == "queue_empty" for e in trace["traceEvents"])
    analysis = read("analysis.json")
    assert list(analysis["joints"]) == list(KEYPOINT_NAMES)
    assert all(set(ERROR_CLASSES) <= set(row) for row in analysis["joints"].values())
    assert analysis["predictions"] == metrics["results"] and set(analysis["ap"]["gain"]) == set(ERROR_CLASSES[1:])
    page = (out / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') >= 8 and "http://" not in page and "https://" not in page
    assert all(d["device"] in page and d["node"] in page for d in devices)
    # The report's cost: far under 5% of the run (run.json's phases, the run's wall from its start).
    report_s, wall_s = run["phases_seconds"]["report"], run["finished"] - run["started"]
    assert 0 < report_s < 0.05 * wall_s, (report_s, wall_s)
    shot, console = open_in_chromium(out / "report.html", out.parent / f"{out.name}-shot.png")
    grey = cv2.cvtColor(shot, cv2.COLOR_BGR2GRAY)
    assert console == [] and grey.std() > 20 and (grey < 128).mean() > 0.02  # rendered, not blank


def check_show(out, dest) -> None:
    """``runner show`` on the run: the worst images by default, or the ones named; whole images drawn."""
    from runner.errors import RunError
    from runner.report_files import show

    worst = show(out, dest=dest)
    assert sorted(p.name for p in worst) == sorted(f"{i:012d}.png" for i in (785, 40083, 196141, 197388))
    for path in worst:
        drawn, image = cv2.imread(str(path)), cv2.imread(str(COCO_MINI / "val2017" / path.name.replace("png", "jpg")))
        assert drawn.shape == image.shape and np.abs(drawn.astype(int) - image).max() > 100  # skeletons on it
    assert [p.name for p in show(out, [785], dest / "one")] == ["000000000785.png"]
    with pytest.raises(RunError, match="--images: .*12345"):
        show(out, [12345], dest / "none")


def test_synthetic_mode_reports_throughput_only_and_two_runs_share_a_fresh_cache(tmp_path):
    """Two runs started together on one empty --models-dir race for its checkpoint, synthetic set and
    ONNX export: every cache file is written whole under a name no other writer uses, so both finish."""
    one, two = at_once(*[lambda out=out: runner("--synthetic", "6", "--bs", "3", "--out", str(tmp_path / out),
                                                "--models-dir", str(tmp_path / "m"), cwd=tmp_path)
                         for out in ("o", "o2")])
    assert "accuracy: n/a (no checkpoint)" in one.stdout and "accuracy: n/a (no checkpoint)" in two.stdout
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["accuracy"] == "n/a (no checkpoint)" and metrics["boxes"] == 6
    assert json.loads((tmp_path / "o" / "throughput.json").read_text())["totals"]["crops"] == 12
    assert (tmp_path / "o" / "keypoints.json").read_bytes() == (tmp_path / "o2" / "keypoints.json").read_bytes()
    assert not [p for p in (tmp_path / "m").rglob("*") if p.name.endswith(".tmp")]


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
