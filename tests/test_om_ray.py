"""The whole CLI with `--backend om` on two fake NPUs, against `--backend onnxruntime --devices cpu`.

A fake `npu-smi` (a 300I Duo: two 310P3 chips) and the fake `atc` are on PATH, the
fake ais_bench/aclruntime on PYTHONPATH; Ray's actor processes inherit both. The
driver exports a static-batch ONNX of a seeded random FastPose, converts it with the
fake atc, and each {"NPU": 1} actor opens InferSession(0, om), which runs that ONNX
with ONNX Runtime. Keypoints must equal the ONNX Runtime backend's exactly.
Slow (~1 min on 2 cores): it exports the real FastPose twice (static and dynamic batch).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKES = REPO / "tests" / "fakes"

pytest.importorskip("ray")
if not (REPO / "runner" / "driver.py").is_file():
    pytest.skip("runner/driver.py is not there yet", allow_module_level=True)


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=540)
    assert out.returncode == 0, f"{args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_om_on_two_fake_npus_equals_onnxruntime_on_cpu(tmp_path):
    models = tmp_path / "models"
    # 18 boxes, bs 4: shards of one batch spread over both devices, and a short last batch (2 boxes).
    common = ["--synthetic", "18", "--bs", "4", "--shard-size", "4", "--models-dir", str(models), "--quiet"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ASCEND_", "FAKE_", "RAY_"))}
    base["PYTHONPATH"] = str(REPO)
    acl_log, atc_log = tmp_path / "acl.jsonl", tmp_path / "atc.jsonl"
    npu_env = dict(base, PATH=f"{FAKES / 'bin'}{os.pathsep}{base['PATH']}",
                   PYTHONPATH=os.pathsep.join([str(FAKES), str(REPO)]), FAKE_AIS_BENCH_API="new",
                   FAKE_ASCEND_SOC="Ascend310P3", FAKE_ACL_LOG=str(acl_log), FAKE_ATC_LOG=str(atc_log))

    run_cli([*common, "--devices", "0,1", "--backend", "om", "--out", str(tmp_path / "om")], npu_env, tmp_path)
    run_cli([*common, "--devices", "cpu", "--backend", "onnxruntime", "--out", str(tmp_path / "ort")], base, tmp_path)

    om = json.loads((tmp_path / "om" / "keypoints.json").read_text())
    ort = json.loads((tmp_path / "ort" / "keypoints.json").read_text())
    assert len(om) == 18 and om == ort

    (argv,) = [json.loads(line) for line in atc_log.read_text().splitlines()]  # converted once
    assert "--input_shape=image:4,3,256,192" in argv and "--soc_version=Ascend310P3" in argv
    sessions = [json.loads(line) for line in acl_log.read_text().splitlines()]
    # One session per actor, each on device 0 of its own visible NPU (spec §4.3).
    assert sorted(s["visible"] for s in sessions) == ["0", "1"]
    assert {s["device_id"] for s in sessions} == {0} and len({s["pid"] for s in sessions}) == 2
    assert all(s["model"].endswith("-Ascend310P3-b4.om") for s in sessions)
    devices = json.loads((tmp_path / "om" / "throughput.json").read_text())["devices"]
    assert sorted(d["id"] for d in devices) == ["npu:0", "npu:1"]
    assert all(d["boxes"] > 0 and d["device_seconds"] > 0 for d in devices)
    assert sum(d["crops"] for d in devices) == 36  # padding rows are not counted
