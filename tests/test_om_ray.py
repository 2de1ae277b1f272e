"""The whole CLI with `--backend om` on two fake NPUs, against `--backend onnxruntime --devices cpu`.

A fake `npu-smi` (a 300I Duo: two 310P3 chips) and the fake `atc` are on PATH, the
fake ais_bench/aclruntime on PYTHONPATH; Ray's actor processes inherit both. The
driver exports a static-batch ONNX of a seeded random FastPose, converts it with the
fake atc, and each {"NPU": 1} actor opens InferSession(0, om), which runs that ONNX
with ONNX Runtime. Keypoints must equal the ONNX Runtime backend's exactly.
Slow (~1 min on 2 cores): it exports the real FastPose twice (static and dynamic batch).
"""
import json
import sys

import pytest

from ray_support import assert_one_session_per_actor, cli_env, fake_npu_env, logged, run_cli

pytest.importorskip("ray")

RUNNER = [sys.executable, "-m", "runner"]


def test_om_on_two_fake_npus_equals_onnxruntime_on_cpu(tmp_path):
    models = tmp_path / "models"
    # 18 boxes, bs 4: shards of one batch spread over both devices, and a short last batch (2 boxes).
    common = ["--synthetic", "18", "--bs", "4", "--shard-size", "4", "--models-dir", str(models), "--quiet"]
    base = cli_env()
    npu_env = fake_npu_env(base, tmp_path, api="new")

    run_cli([*RUNNER, *common, "--devices", "0,1", "--backend", "om", "--out", str(tmp_path / "om")], npu_env, tmp_path)
    run_cli([*RUNNER, *common, "--devices", "cpu", "--backend", "onnxruntime", "--out", str(tmp_path / "ort")], base, tmp_path)

    om = json.loads((tmp_path / "om" / "keypoints.json").read_text())
    ort = json.loads((tmp_path / "ort" / "keypoints.json").read_text())
    assert len(om) == 18 and om == ort

    (argv,) = logged(tmp_path / "atc.jsonl")  # converted once
    assert "--input_shape=image:4,3,256,192" in argv and "--soc_version=Ascend310P3" in argv
    assert_one_session_per_actor(logged(tmp_path / "acl.jsonl"), "-Ascend310P3-b4.om")
    devices = json.loads((tmp_path / "om" / "throughput.json").read_text())["devices"]
    assert sorted(d["id"] for d in devices) == ["npu:0", "npu:1"]
    assert all(d["boxes"] > 0 and d["device_seconds"] > 0 for d in devices)
    assert sum(d["crops"] for d in devices) == 36  # padding rows are not counted


def test_fused_flip_uint8_om_on_fake_npus_equals_plain_onnxruntime(tmp_path):
    """The fast variant through ATC and ais_bench: NHWC uint8 input (ND), one call per batch."""
    models = tmp_path / "models"
    common = ["--synthetic", "10", "--bs", "4", "--shard-size", "4", "--models-dir", str(models), "--quiet"]
    base = cli_env()
    npu_env = fake_npu_env(base, tmp_path, api="old")

    run_cli([*RUNNER, *common, "--devices", "0,1", "--backend", "om", "--fused-flip", "--uint8-input",
             "--out", str(tmp_path / "om")], npu_env, tmp_path)
    run_cli([*RUNNER, *common, "--devices", "cpu", "--backend", "onnxruntime", "--out", str(tmp_path / "ort")], base, tmp_path)

    om = json.loads((tmp_path / "om" / "keypoints.json").read_text())
    assert len(om) == 10 and om == json.loads((tmp_path / "ort" / "keypoints.json").read_text())
    (argv,) = logged(tmp_path / "atc.jsonl")
    assert "--input_shape=image:4,256,192,3" in argv and "--input_format=ND" in argv
    totals = json.loads((tmp_path / "om" / "throughput.json").read_text())["totals"]
    assert totals["bytes_to_device_per_box"] == 256 * 192 * 3  # uint8, the mirror made on the device
    assert totals["bytes_from_device_per_box"] == 17 * 64 * 48 * 4  # merged heatmaps only
    assert totals["crops"] == 20
