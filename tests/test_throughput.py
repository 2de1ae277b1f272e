"""Fused flip and uint8 input give the plain path's keypoints; the sim backend, prep sizing and bench.

Identity is checked on coco-mini's real crops (the synthetic set's in a clone without
../shared): ONNX Runtime bit for bit, PyTorch's fused flip within its batch-size
rounding (a batch of 2n sums differently from two of n).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import COCO_MINI, COCO_MINI_DETS, SHARED
from runner.config import ConfigError, load_config
from cluster.placement import host_processes
from tasks.backends import open_backend
from tasks.dataset import load_boxes, read_rgb
from tasks.export import ExportOptions, export_onnx
from tasks.pipeline import keypoints_for_batch, prepare_batch
from tasks.variant import Variant, bytes_per_box
from ray_support import at_once
from test_cli import runner

FUSED, UINT8, BOTH = Variant(fused_flip=True), Variant(uint8_input=True), Variant(True, True)


@pytest.fixture(scope="module")
def batches(synthetic_coco):
    """coco-mini's detections in batches of 16: the first two and the short last one (38 boxes on
    3 of its 4 images); the synthetic set's (18, one short batch) without ../shared."""
    if SHARED.is_dir():
        box_set = load_boxes(str(COCO_MINI), str(COCO_MINI_DETS))
    else:
        box_set = load_boxes(synthetic_coco["dataroot"], synthetic_coco["dets"])
    images = {i: read_rgb(p) for i, p in box_set.image_paths.items()}
    boxes = box_set.boxes
    every = [prepare_batch(boxes[i:i + 16], images) for i in range(0, len(boxes), 16)]
    return every[:2] + every[2:][-1:]


@pytest.fixture(scope="module")
def variant_onnx(random_checkpoint, models_dir, batches):
    crops = batches[0].crops[:4]
    return {v: str(export_onnx(random_checkpoint, models_dir, ExportOptions(variant=v), crops))
            for v in (Variant(), FUSED, UINT8, BOTH)}


def keypoints(backend, batches) -> tuple[np.ndarray, list]:
    done = [keypoints_for_batch(backend, b) for b in batches]
    return np.concatenate([k for k, _ in done]), [i for _, i in done]


@pytest.fixture(scope="module")
def plain_onnxruntime(variant_onnx, batches) -> np.ndarray:
    return keypoints(open_backend("onnxruntime", variant_onnx[Variant()], "cpu", 16, 2), batches)[0]


@pytest.mark.parametrize("variant", [FUSED, UINT8, BOTH], ids=["fused", "uint8", "fused+uint8"])
def test_onnxruntime_variants_give_identical_keypoints(variant, variant_onnx, batches, plain_onnxruntime):
    plain = plain_onnxruntime
    got, inferred = keypoints(open_backend("onnxruntime", variant_onnx[variant], "cpu", 16, 2, variant), batches)
    assert len(plain) == sum(len(b.box_ids) for b in batches) >= 12
    assert np.array_equal(got, plain)  # every coordinate and score, bit for bit
    n = len(batches[0].box_ids)
    calls = 1 if variant.fused_flip else 2
    assert inferred[0].calls == calls and inferred[0].crops == 2 * n
    assert inferred[0].bytes_to_device == n * bytes_per_box(variant, True)["to_device"]
    assert inferred[0].bytes_from_device == n * bytes_per_box(variant, True)["from_device"]


def test_torch_variants(random_checkpoint, batches):
    batches = batches[:1]  # PyTorch is the slow one; the ONNX tests cover the other batches
    plain, _ = keypoints(open_backend("torch", random_checkpoint, "cpu", 16, 2), batches)
    uint8, _ = keypoints(open_backend("torch", random_checkpoint, "cpu", 16, 2, UINT8), batches)
    assert np.array_equal(uint8, plain)  # in-graph normalisation = the host's table, bit for bit
    fused, _ = keypoints(open_backend("torch", random_checkpoint, "cpu", 16, 2, BOTH), batches)
    assert np.array_equal(fused[..., :2], plain[..., :2])
    # measured 2.2e-8 on coco-mini: PyTorch's CPU convolutions sum a batch of 2n differently
    assert np.max(np.abs(fused[..., 2] - plain[..., 2])) < 1e-6


def test_bytes_per_box():
    assert bytes_per_box(Variant(), flip=True) == {"to_device": 2 * 589824, "from_device": 2 * 208896}
    assert bytes_per_box(UINT8, flip=True) == {"to_device": 2 * 147456, "from_device": 2 * 208896}
    assert bytes_per_box(BOTH, flip=True) == {"to_device": 147456, "from_device": 208896}
    assert bytes_per_box(Variant(), flip=False) == {"to_device": 589824, "from_device": 208896}


def test_model_of_another_variant_is_one_line(variant_onnx):
    from tasks.backends import BackendUnavailable

    with pytest.raises(BackendUnavailable, match=r"takes tensor\(float\) .* sends tensor\(uint8\)"):
        open_backend("onnxruntime", variant_onnx[Variant()], "cpu", 16, 1, UINT8)


def test_openvino_agrees_with_onnxruntime(variant_onnx, batches, plain_onnxruntime):
    pytest.importorskip("openvino", reason="optional backend: pip install openvino")
    ref = plain_onnxruntime  # = the fused uint8 model's, bit for bit (test above)
    got, _ = keypoints(open_backend("openvino", variant_onnx[BOTH], "cpu", 16, 2, BOTH), batches)
    same = np.all(np.abs(got - ref)[..., :2] <= 1e-3, axis=-1)
    assert same.mean() >= 0.995
    assert np.max(np.abs(got[..., 2] - ref[..., 2])) < 1e-5


def test_sim_backend_takes_the_time_of_its_rate():
    sim = open_backend("sim", None, "cpu", 8, 1, Variant(), sim_rate=2000.0)
    x = np.zeros((8, 3, 256, 192), np.float32)
    t0 = time.perf_counter()
    heatmaps, seconds = sim.run(x)
    assert time.perf_counter() - t0 >= seconds == 8 / 2000.0
    assert heatmaps.shape == (8, 17, 64, 48) and not heatmaps.any()
    out = np.full((5, 17, 64, 48), np.nan, np.float32)  # a worker's slot holds the last batch's heatmaps
    assert sim.run(x[:5], out)[0] is out and not out.any()
    fused = open_backend("sim", None, "cpu", 8, 1, BOTH, sim_rate=2000.0)
    assert fused.run(np.zeros((4, 256, 192, 3), np.uint8))[1] == 8 / 2000.0  # 4 boxes = 8 network inputs
    with pytest.raises(ValueError, match="must be a positive number"):
        open_backend("sim", None, "cpu", 8, 1, sim_rate=0.0)


def test_host_processes_are_sized_to_the_host():
    assert host_processes(3, "cpu", "onnxruntime", 8.0) == 3  # configured wins
    assert host_processes(0, "cpu", "onnxruntime", 8.0) == 1  # the backend owns the cores
    assert host_processes(0, "npu:0", "om", 6.0) == 6  # a device leaves them to the host work
    assert host_processes(0, "cpu", "sim", 1.0) == 1
    assert host_processes(0, "cuda:0", "torch", 48.0) == 8


def test_config_refuses_fused_flip_without_flip_and_bad_rates():
    with pytest.raises(ConfigError, match="fused_flip: a fused-flip model always runs the flip test"):
        load_config(None, {"fused_flip": True, "flip": False})
    with pytest.raises(ConfigError, match="sim_rate: 0 is not a positive number"):
        load_config(None, {"sim_rate": 0})
    with pytest.raises(ConfigError, match="sim_gil: 'keep' is not one of hold, release"):
        load_config(None, {"sim_gil": "keep"})
    assert load_config(None, {}).backend.sim_gil == "hold"


def test_cli_variants_same_keypoints_and_bytes_in_throughput(tmp_path, synthetic_coco, random_checkpoint, models_dir):
    coco = synthetic_coco
    common = ["--dataroot", coco["dataroot"], "--dets", coco["dets"], "--weights", random_checkpoint,
              "--backend", "onnxruntime", "--bs", "4", "--models-dir", models_dir, "--quiet"]
    at_once(lambda: runner(*common, "--no-uint8-input", "--out", str(tmp_path / "plain")),
            lambda: runner(*common, "--out", str(tmp_path / "default")),  # auto: uint8 input for onnxruntime on cpu
            lambda: runner(*common, "--fused-flip", "--uint8-input", "--out", str(tmp_path / "fast")))
    plain, default, fast = tmp_path / "plain", tmp_path / "default", tmp_path / "fast"
    assert (fast / "keypoints.json").read_bytes() == (plain / "keypoints.json").read_bytes()
    assert (default / "keypoints.json").read_bytes() == (plain / "keypoints.json").read_bytes()
    tp_plain = json.loads((plain / "throughput.json").read_text())["totals"]
    tp_default = json.loads((default / "throughput.json").read_text())["totals"]
    tp_fast = json.loads((fast / "throughput.json").read_text())["totals"]
    assert tp_plain["bytes_to_device_per_box"] == 1179648 and tp_plain["bytes_from_device_per_box"] == 417792
    assert tp_default["bytes_to_device_per_box"] == 294912 and tp_default["bytes_from_device_per_box"] == 417792
    assert tp_fast["bytes_to_device_per_box"] == 147456 and tp_fast["bytes_from_device_per_box"] == 208896
    assert tp_fast["crops"] == tp_plain["crops"] == 2 * tp_plain["boxes"]
    settled = {name: json.loads((tmp_path / name / "run.json").read_text())["plan"]["uint8_input"]
               for name in ("plain", "default", "fast")}
    assert settled == {"plain": False, "default": True, "fast": True}


@pytest.mark.parametrize("backend, devices, asked, settled", [
    ("onnxruntime", "cpu", None, True), ("torch", "cpu:2", None, True),  # bit for bit on a CPU (tests above)
    ("openvino", "cpu", None, False),  # its in-graph normalisation differs in the 7th digit
    ("om", "npu", None, False), ("onnxruntime", "cuda", None, False), ("sim", "cpu", None, False),
    ("onnxruntime", "cpu", False, False), ("om", "npu", True, True),  # asked for: kept
])
def test_uint8_input_auto_is_on_where_it_is_exact_on_the_host(backend, devices, asked, settled):
    from cluster.devices import Device
    from runner.plan import settle

    kind, _, count = devices.partition(":")
    cfg = load_config(None, {"uint8_input": asked, "backend": backend})
    assert cfg.model.uint8_input is asked  # the default YAML says auto
    devices = [Device(kind, i, kind, soc="Ascend310P3" if kind == "npu" else None) for i in range(int(count or 1))]
    (plan,) = settle(cfg, devices)
    assert plan.variant.uint8_input is settled and plan.backend == backend


def test_uint8_input_config_values():
    assert load_config(None, {"uint8_input": "auto"}).model.uint8_input is None
    assert load_config(None, {"uint8_input": True}).model.uint8_input is True
    with pytest.raises(ConfigError, match="uint8_input: 'yes' is not true, false or auto"):
        load_config(None, {"uint8_input": "yes"})


def test_bench_prints_every_figure_in_its_last_line(tmp_path, models_dir):
    proc = runner("bench", "--synthetic", "16", "--backend", "onnxruntime", "--bs", "8", "--threads", "1",
                  "--sim-devices", "2", "--sim-seconds", "0.5", "--sim-rate", "400", "--uint8-input", "--rounds", "1",
                  "--fused-flip", "--models-dir", models_dir, "--out", str(tmp_path / "bench"))
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures == json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert figures["backend"] == "onnxruntime" and figures["threads"] == 1 and figures["crops"] == 32
    assert figures["e2e_over_bare"] == pytest.approx(figures["e2e_crops_per_s"] / figures["bare_crops_per_s"])
    assert figures["rounds"] == 1 and len(figures["e2e_runs_crops_per_s"]) == 1
    assert len(figures["bare_runs_crops_per_s"]) == 2  # bare, run, bare
    assert figures["bare_crops_per_s"] == pytest.approx(np.mean(figures["bare_runs_crops_per_s"]))
    assert figures["e2e_crops_per_s"] == pytest.approx(np.mean(figures["e2e_runs_crops_per_s"]))
    assert 0 < figures["e2e_over_bare"] < 1.5
    host = figures["host_alone"]  # measured before the run and after it, the mean taken
    assert host["boxes"] == 16 and len(host["runs_boxes_per_s"]) == 2
    assert host["boxes_per_s"] == pytest.approx(np.mean(host["runs_boxes_per_s"]))
    assert figures["e2e_of_possible"] == pytest.approx(
        figures["e2e_boxes_per_s"] / min(host["boxes_per_s"], figures["device_alone_boxes_per_s"]))
    assert figures["bytes_to_device_per_box"] == 147456 and figures["bytes_from_device_per_box"] == 208896
    scaling = figures["scaling"]
    assert scaling["sim_rate"] == 400 and [r["devices"] for r in scaling["runs"]] == [1, 2]
    # a sim device sleeps to its deadline: alone it cannot beat its rate
    assert 0.5 * 400 < scaling["alone_crops_per_s"] <= 400
    for row in scaling["runs"]:
        assert row["ideal_crops_per_s"] == pytest.approx(row["devices"] * scaling["alone_crops_per_s"])
        assert 0.3 < row["of_ideal"] <= 1.05


class _Recorder:
    """A backend that keeps what it was handed."""

    def __init__(self, batch_size: int, variant: Variant) -> None:
        self.batch_size, self.variant, self.seen = batch_size, variant, []

    def run(self, x, out=None):
        self.seen.append((x.shape, x.dtype, float(x.min()), float(x.max())))
        return np.zeros((len(x), 17, 64, 48), np.float32), 0.0


@pytest.mark.parametrize("variant, flip, calls, shape, dtype", [
    (Variant(), True, 2, (5, 3, 256, 192), np.float32),
    (Variant(), False, 1, (5, 3, 256, 192), np.float32),
    (Variant(fused_flip=True, uint8_input=True), True, 1, (5, 256, 192, 3), np.uint8),
])
def test_warm_up_runs_full_batches_of_what_the_run_sends(variant, flip, calls, shape, dtype):
    from tasks.pipeline import warm_up
    from tasks.transforms import crops_to_input
    backend = _Recorder(5, variant)
    warm_up(backend, flip)
    black = crops_to_input(np.zeros((1, 256, 192, 3), np.uint8)) if dtype == np.float32 else np.zeros(1)
    assert [s[:2] for s in backend.seen] == [(shape, np.dtype(dtype))] * calls
    # black crops, normalised as a real batch would be (mirrored, they are the same)
    assert {s[2:] for s in backend.seen} == {(float(black.min()), float(black.max()))}


def test_scale_bench_splits_the_whole_command(tmp_path):
    """``bench --scale N``: its set on up to 5,000 images, each batch size's phases, memory and evaluation."""
    proc = runner("bench", "--scale", "40", "--bs", "4,8", "--sim-devices", "2", "--sim-rate", "5000",
                  "--models-dir", str(tmp_path / "models"), "--out", str(tmp_path / "bench"))
    figures = json.loads(proc.stdout.strip().splitlines()[-1])["scale"]
    assert figures["boxes"] == 40 and figures["sim_devices"] == 2 and figures["results"] > 0
    assert [r["bs"] for r in figures["runs"]] == [4, 8]
    for r in figures["runs"]:
        run_json = json.loads((Path(r["out"]) / "run.json").read_text())
        assert r["phases_seconds"] == run_json["phases_seconds"]
        assert r["outside_window_s"] == pytest.approx(sum(r["phases_seconds"].values()) - r["dispatch_window_s"])
        assert r["dispatch_window_s"] > 0 and run_json["backend"] == "sim"
        assert json.loads((Path(r["out"]) / "throughput.json").read_text())["totals"]["boxes"] == 40
    assert 100 < figures["driver_peak_rss_mb"] < 4000 and figures["evaluation_seconds"] > 0
    ann = json.loads((tmp_path / "models" / "scale" / "n40-seed0" / "annotations" /
                      "person_keypoints_val2017.json").read_text())
    # val2017's shape: 2 annotated persons an image (on up to 5,000 images), then the detector's extra boxes
    assert len(ann["images"]) == 20 and len(ann["annotations"]) == 40 and ann["images"][0]["height"] == 480
    assert "40 boxes on 2 sim devices: the whole command" in proc.stdout
