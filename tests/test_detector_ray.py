"""The detector stage on Ray: `runner detect` over devices, the OM path, detection inside a pose run.

The network is the real yolov3-spp.cfg of ../shared with seeded random weights in the
real file layout; in a clone without ../shared, test_detector.py's tiny cfg stands in
(same code paths, a smaller network). The images are the synthetic COCO set (3 images,
ids 1000-1002, listed in descending id order in the annotation file so the ascending-id
output order is checked). Each image costs ~0.5 s per backend on 2 cores with the real
cfg; a CLI run adds ~10 s of start-up (Python, Ray, workers).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from ray_support import assert_one_session_per_actor, cli_env, fake_npu_env, logged, run_cli

pytest.importorskip("ray")

THREADS = "2"  # torch's CPU sums depend on the thread count; upstream's need >= 2 (spec §10)


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    """The synthetic COCO root, seeded yolov3-spp weights beside the real cfg, a models dir, and a run cache."""
    import cv2

    from tasks.detector import Darknet, parse_darknet_cfg
    from tasks.detector.preprocess import letterbox_bgr_to_rgb_input
    from tasks.synthetic import write_synthetic_coco
    from test_detector import REAL_CFG, TINY_CFG, seeded_weights

    d = tmp_path_factory.mktemp("detector")
    coco = write_synthetic_coco(d / "coco", 9, seed=5, persons_per_image=3)
    ann = json.loads(Path(coco["ann"]).read_text())
    ann["images"] = ann["images"][::-1]  # the file's order is not the output's
    Path(coco["ann"]).write_text(json.dumps(ann))
    first = Path(coco["dataroot"]) / "val2017" / ann["images"][-1]["file_name"]
    calib = letterbox_bgr_to_rgb_input(cv2.imread(str(first)), 608)
    (d / "w").mkdir()
    cfg = d / "w" / "yolov3-spp.cfg"
    real = REAL_CFG.is_file()
    cfg.write_text(REAL_CFG.read_text() if real else TINY_CFG)
    # ~9 (real: 28 in all, 9 of them flat) or ~15 (tiny) boxes per image, so the pose stage after it stays quick.
    weights = seeded_weights(Darknet(parse_darknet_cfg(cfg)), d / "w" / "yolov3-spp.weights", 0, calib,
                             obj_logit=-6.0 if real else -7.0)
    return {"dir": d, "coco": coco, "weights": weights, "cfg": cfg, "models": d / "models", "runs": {}}


def detect(det: dict, backend: str, devices: str, threads: str, env: dict | None = None, tag: str = "") -> dict:
    """`runner detect` once per (backend, devices, threads, tag): the file's bytes and its log."""
    key = (backend, devices, threads, tag)
    if key not in det["runs"]:
        out = det["dir"] / f"dets-{backend}{tag}-{devices.replace(':', '_').replace(',', '_')}-t{threads}.json"
        proc = run_cli([sys.executable, "-m", "runner", "detect", "--dataroot", det["coco"]["dataroot"],
                        "--weights", str(det["weights"]), "--out", str(out), "--devices", devices,
                        "--backend", backend, "--threads", threads, "--models-dir", str(det["models"])],
                       env or cli_env(), det["dir"])
        det["runs"][key] = {"bytes": out.read_bytes(), "log": proc.stdout, "path": out}
    return det["runs"][key]


def images_per_device(log: str) -> dict[str, int]:
    """From the per-device summary lines: '     cpu:0: 2 images, ...'."""
    found = {}
    for line in log.splitlines():
        head, sep, rest = line.strip().partition(": ")
        if sep and head.startswith(("cpu:", "npu:", "cuda:")) and rest.split()[1:2] == ["images,"]:
            found[head] = int(rest.split()[0])
    return found


def reference(det: dict) -> bytes:
    """The file as one process writes it with torch on 2 threads, images in ascending id."""
    import torch

    from tasks.detector import build_darknet, coco_image_list, detect_image, torch_net_fn

    model = build_darknet(det["cfg"], det["weights"])
    images = coco_image_list(det["coco"]["ann"], Path(det["coco"]["dataroot"]) / "val2017")
    threads = torch.get_num_threads()
    torch.set_num_threads(int(THREADS))
    try:
        records = [r for path, i in images for r in detect_image(torch_net_fn(model), path, i, model.cfg.yolo_heads)]
    finally:
        torch.set_num_threads(threads)
    return json.dumps(records).encode()  # as write_detections


def max_differences(a: list[dict], b: list[dict]) -> tuple[float, float]:
    """Largest bbox and score difference of two files with the same records in the same order."""
    assert [r["image_id"] for r in a] == [r["image_id"] for r in b]
    box = max(float(np.abs(np.subtract(x["bbox"], y["bbox"])).max()) for x, y in zip(a, b))
    return box, max(abs(x["score"] - y["score"]) for x, y in zip(a, b))


def test_torch_writes_upstreams_file_in_upstreams_order(det):
    """One device; on two, the pose run below detects with torch on cpu:2 and must write these bytes."""
    one = detect(det, "torch", "cpu", THREADS)
    assert one["bytes"] == reference(det)
    records = json.loads(one["bytes"])
    ids = [r["image_id"] for r in records]
    assert ids == sorted(ids) and set(ids) == {1000, 1001, 1002} and len(records) > 10
    for i in set(ids):
        scores = [r["score"] for r in records if r["image_id"] == i]
        assert scores == sorted(scores, reverse=True)
    assert images_per_device(one["log"]) == {"cpu:0": 3}


def test_onnxruntime_one_and_two_devices_identical_and_close_to_torch(det):
    one = detect(det, "onnxruntime", "cpu", "1")
    two = detect(det, "onnxruntime", "cpu:2", "1")
    assert one["bytes"] == two["bytes"]
    assert min(images_per_device(two["log"]).values()) >= 1
    ort, torch_ = json.loads(one["bytes"]), json.loads(detect(det, "torch", "cpu", THREADS)["bytes"])
    # Spec §10: ONNX Runtime is not bit-equal to torch; same boxes within ~0.05 px / 1e-4.
    box, score = max_differences(ort, torch_)
    print(f"onnxruntime vs torch: {len(ort)} records, max |bbox| {box:.3g} px, max |score| {score:.3g}")
    assert box <= 0.05 and score <= 1e-4
    assert list(det["models"].glob("yolov3spp-*-b1.onnx"))  # one static-batch export, cached


@pytest.mark.parametrize("api", ["new", "old"])  # old: a 2023 build, whose context belongs to one thread
def test_om_on_two_fake_npus_equals_onnxruntime(det, tmp_path, api):
    """The detector's OM session is opened, run and closed on one thread of each actor; the
    2023 fakes raise ACL 107002 on a call from any other."""
    env = fake_npu_env(cli_env(), tmp_path, api=api)
    om = detect(det, "om", "0,1", "1", env, tag=api)
    ort = detect(det, "onnxruntime", "cpu", "1")
    box, score = max_differences(json.loads(om["bytes"]), json.loads(ort["bytes"]))
    print(f"om (fake) vs onnxruntime: max |bbox| {box:.3g} px, max |score| {score:.3g}")
    assert om["bytes"] == ort["bytes"]
    shares = images_per_device(om["log"])
    assert set(shares) == {"npu:0", "npu:1"} and sum(shares.values()) == 3 and min(shares.values()) >= 1
    # Converted once in the module: by whichever generation's run comes first, reused by the other.
    converted = logged(tmp_path / "atc.jsonl") if (tmp_path / "atc.jsonl").exists() else []
    assert len(converted) == (0 if det.setdefault("om_converted", api) != api else 1)
    for argv in converted:
        assert "--input_shape=input:1,3,608,608" in argv and "--soc_version=Ascend310P3" in argv
    assert_one_session_per_actor(logged(tmp_path / "acl.jsonl"), "-Ascend310P3-b1.om")
    (sidecar,) = [json.loads(p.read_text()) for p in det["models"].glob("yolov3spp-*-b1.json")]
    assert sidecar["input"] == {"name": "input", "shape": [1, 3, 608, 608]} and sidecar["batch_size"] == 1


def test_run_detects_a_missing_dets_file_first_then_poses(det, random_checkpoint, tmp_path):
    dets = tmp_path / "made" / "dets.json"
    out = tmp_path / "out"
    args = [sys.executable, "-m", "runner", "--dataroot", det["coco"]["dataroot"], "--dets", str(dets),
            "--detector-weights", str(det["weights"]), "--detector-cfg", str(det["cfg"]),
            "--weights", random_checkpoint, "--backend", "torch", "--threads", THREADS, "--devices", "cpu:2",
            "--bs", "16", "--models-dir", str(det["models"]), "--out", str(out)]
    proc = run_cli(args, cli_env(), tmp_path)
    assert "not there yet: detecting the persons of 3 images first" in proc.stdout
    assert dets.read_bytes() == detect(det, "torch", "cpu", THREADS)["bytes"]  # two devices write one's file
    shares = images_per_device(proc.stdout)
    assert set(shares) == {"cpu:0", "cpu:1"} and sum(shares.values()) == 3 and min(shares.values()) >= 1
    n = len(json.loads(dets.read_bytes()))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["box_source"] == str(dets) and metrics["boxes"] == n and isinstance(metrics["AP"], float)
    # Random weights also find "persons" in the letterbox padding: clamped to the image they
    # have zero height, and the pose stage skips them by its box policy (README, fault 8).
    flat = [i for i, r in enumerate(json.loads(dets.read_bytes())) if min(r["bbox"][2:]) <= 0]
    assert [s["box_index"] for s in metrics["skipped_boxes"]] == flat
    assert {s["reason"] for s in metrics["skipped_boxes"]} <= {"bbox has zero or negative width or height"}
    assert metrics["results_before_nms"] == n - len(flat) > 10
    keypoints = json.loads((out / "keypoints.json").read_text())
    assert 0 < len(keypoints) <= n and {k["image_id"] for k in keypoints} <= {1000, 1001, 1002}
    assert all(len(k["keypoints"]) == 51 for k in keypoints)
    run = json.loads((out / "run.json").read_text())
    assert run["box_source_sha256"] == __import__("hashlib").sha256(dets.read_bytes()).hexdigest()


def test_no_box_source_names_the_detector_and_detector_needs_dets(synthetic_coco, random_checkpoint, tmp_path):
    base = [sys.executable, "-m", "runner", "--dataroot", synthetic_coco["dataroot"], "--weights", random_checkpoint]
    for more, needle in (([], "a box source (--dets FILE, --boxes gt, or --dets FILE with --detector-weights"),
                         (["--detector-weights", str(tmp_path / "y.weights")], "--detector-weights needs --dets FILE"),
                         (["--dets", str(tmp_path / "absent.json")],
                          "absent.json: detection file not found; give the right --dets, or --detector-weights"),
                         (["--dets", str(tmp_path / "absent.json"), "--detector-weights", str(tmp_path / "y.weights")],
                          "y.weights: --detector-weights not found")):
        out = tmp_path / f"out{len(more)}"
        proc = run_cli([*base, *more, "--out", str(out)], cli_env(), tmp_path, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("error: ") and needle in proc.stderr, proc.stderr
        assert not (out / "keypoints.json").exists() and not (tmp_path / "absent.json").exists()


def test_a_lost_detector_worker_hands_its_shards_to_the_other(det):
    """SIGKILL one of two workers as soon as they are up: its shards are requeued, the file is complete."""
    import re
    import signal

    from cluster.session import ray_session
    from runner.detect import DetectJob, check_detect_inputs, detect_on_session

    out = det["dir"] / "dets-after-loss.json"
    inputs = check_detect_inputs(DetectJob(det["coco"]["dataroot"], None, str(det["weights"]), None, str(out),
                                           shard_size=1))
    lines: list[str] = []
    killed = []

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("detector workers: ") and not killed:  # before the first shard is sent
            label, pid = re.findall(r"(cpu:\d) pid (\d+)", line)[1]
            os.kill(int(pid), signal.SIGKILL)
            killed.append(label)

    with ray_session("cpu:2") as session:
        outcome = detect_on_session(session, inputs, "torch", str(det["models"]), int(THREADS), log)
    assert killed == ["cpu:1"] and outcome.lost_devices == ["cpu:1"]
    assert any(line.startswith("device cpu:1 lost (") for line in lines), lines
    assert outcome.devices["cpu:0"]["images"] == 3 and outcome.devices["cpu:1"]["images"] == 0
    assert out.read_bytes() == detect(det, "torch", "cpu", THREADS)["bytes"]


def test_a_truncated_image_gets_no_detections_and_is_named_the_others_unchanged(det, tmp_path):
    """Read as the pose stage reads: libjpeg's grey padding of a truncated JPEG is never detected on."""
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(det["coco"]["dataroot"], root)
    cut = sorted((root / "val2017").glob("*.jpg"))[1]
    cut.write_bytes(cut.read_bytes()[:3000])
    cut_id = int(cut.stem)
    out = tmp_path / "dets.json"
    proc = run_cli([sys.executable, "-m", "runner", "detect", "--dataroot", str(root), "--weights",
                    str(det["weights"]), "--out", str(out), "--devices", "cpu", "--backend", "onnxruntime",
                    "--threads", "1", "--models-dir", str(det["models"])], cli_env(), tmp_path)
    full = json.loads(detect(det, "onnxruntime", "cpu", "1")["bytes"])
    got = json.loads(out.read_text())
    assert {r["image_id"] for r in got} == {r["image_id"] for r in full} - {cut_id}
    assert got == [r for r in full if r["image_id"] != cut_id]  # the others' records, byte for byte in order
    lines = [line for line in proc.stdout.splitlines() if str(cut) in line]
    assert lines == [f"{cut}: truncated JPEG (no end-of-image marker) (image id {cut_id}): no detections for it"]
    record = json.loads((tmp_path / "dets.skipped_images.json").read_text())
    assert record == {"skipped_images": [{"image_id": cut_id, "file": str(cut),
                                          "reason": f"{cut}: truncated JPEG (no end-of-image marker)"}]}
