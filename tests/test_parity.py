"""``--check-backend``: the run's first boxes once more through a reference backend, box by box.

On coco-mini's real images: test_cli.py::test_coco_mini_cpu_and_two_cpu_workers_identical."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("ray")

from conftest import SHARED  # noqa: E402
from ray_support import config  # noqa: E402
from runner.driver import run  # noqa: E402
from runner.parity import TOLERANCES, checked_boxes, tolerance_for, verdict  # noqa: E402


@pytest.mark.skipif(SHARED.is_dir(), reason="coco-mini's real images cover it: "
                    "test_cli.py::test_coco_mini_cpu_and_two_cpu_workers_identical")
def test_onnxruntime_against_torch_on_the_synthetic_set(tmp_path, data):
    out = tmp_path / "out"
    run(config(data["coco"], data["ckpt"], data["models"], out, backend="onnxruntime", check_backend="torch",
               check_boxes=5))
    parity = json.loads((out / "parity.json").read_text())
    assert parity["reference_backend"] == "torch" and parity["backend"] == "onnxruntime"
    assert parity["boxes"] == 6 == parity["matched"]  # 5 rounded up to whole batches of 2
    assert parity["max_abs_px"] < 1e-3 and parity["frac_within_1e-3px"] >= 0.995
    assert parity["verdict"] == "pass" and parity["tolerance"]["name"] == "fp32"


def test_a_perturbed_reference_fails_the_verdict(tmp_path, data, monkeypatch):
    import runner.parity as parity_module

    real = parity_module.reference_keypoints

    def shifted(*args):
        ids, kpts, crops = real(*args)
        kpts = kpts.copy()
        kpts[0, 3, 0] += 0.01  # one joint of one box, 0.01 px to the right
        return ids, kpts, crops

    monkeypatch.setattr(parity_module, "reference_keypoints", shifted)
    out = tmp_path / "out"
    lines = []
    run(config(data["coco"], data["ckpt"], data["models"], out, backend="onnxruntime", check_backend="torch",
               check_boxes=4, quiet=False), log=lambda line, *a, **k: lines.append(str(line)))
    parity = json.loads((out / "parity.json").read_text())
    assert parity["verdict"] == "fail" and parity["max_abs_px"] == pytest.approx(0.01, abs=1e-3)
    assert parity["frac_within_1e-3px"] == pytest.approx(1 - 1 / (4 * 17))
    assert [line for line in lines if line.startswith("parity onnxruntime vs torch on 4 boxes: FAIL (")]


def test_verdict_and_tolerances():
    assert tolerance_for("om") == ("fp16", TOLERANCES["fp16"]) and tolerance_for("onnxruntime")[0] == "fp32"
    good = {"max_abs_px": 1e-5, "frac_within_1e-3px": 1.0, "max_abs_score": 0.0}
    assert verdict(good, TOLERANCES["fp32"])
    assert not verdict(dict(good, max_abs_px=2e-3), TOLERANCES["fp32"])
    assert not verdict({**good, "frac_within_1e-3px": 0.99}, TOLERANCES["fp32"])
    assert not verdict({"frac_within_0.5px": 0.99, "mean_oks": None}, TOLERANCES["fp16"])  # nothing compared
    assert verdict({"frac_within_0.5px": 0.96, "mean_oks": 0.995}, TOLERANCES["fp16"])


def test_checked_boxes_are_whole_batches():
    boxes = list(range(10))
    assert checked_boxes(boxes, 5, 4) == list(range(8)) and checked_boxes(boxes, 64, 4) == boxes
    assert checked_boxes(boxes, 1, 1) == [0] and len(checked_boxes(np.arange(10).tolist(), 8, 4)) == 8


MODES = ("force_fp16", "must_keep_origin_dtype")


def test_om_against_the_checkpoint_on_fake_npus_per_precision_mode(tmp_path, exported):
    """``--backend om --check-backend torch``: the OM-vs-pth check, the OM run through the fake ais_bench;
    two ``--precision-mode``s run like two batch sizes: an OM each, a parity each, a summary row each."""
    import csv
    import sys

    from ray_support import cli_env, fake_npu_env, logged, run_cli
    from tasks.export import ExportOptions

    models = exported(tmp_path / "models", ExportOptions(batch_size=4))

    out = tmp_path / "om"
    proc = run_cli([sys.executable, "-m", "runner", "--synthetic", "8", "--bs", "4", "--devices", "0,1",
                    "--backend", "om", "--check-backend", "torch", "--check-boxes", "4", "--threads", "2",
                    "--precision-mode", ",".join(MODES), "--models-dir", str(models), "--out", str(out)],
                   fake_npu_env(cli_env(), tmp_path), tmp_path)
    for mode in MODES:
        parity = json.loads((out / f"bs4-{mode}" / "parity.json").read_text())
        assert parity["backend"] == "om" and parity["reference_backend"] == "torch" and parity["boxes"] == 4
        assert parity["tolerance"]["name"] == f"fp16 (ATC precision_mode {mode})" and parity["verdict"] == "pass"
        # The fake runs the OM's ONNX on this CPU in fp32: the checkpoint's keypoints to ~1e-5 px.
        assert parity["max_abs_px"] < 1e-3 and parity["mean_oks"] > 0.999
        assert json.loads((out / f"bs4-{mode}" / "run.json").read_text())["plan"]["precision_mode"] == mode
    assert proc.stdout.count("parity om vs torch on 4 boxes: PASS (") == 2
    argvs = logged(tmp_path / "atc.jsonl")  # one OM per mode, the default's without the flag
    assert [[a for a in argv if a.startswith("--precision_mode")] for argv in argvs] == \
        [[], ["--precision_mode=must_keep_origin_dtype"]]
    with open(out / "summary.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0][:4] == ["model", "backend", "precision", "bs"]
    assert [row[2:4] for row in table[1:]] == [[MODES[0], "4"], [MODES[1], "4"]]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["knee_by_precision"]) == set(MODES)
    import matplotlib.pyplot as plt

    from runner.report import throughput_figure

    fig = throughput_figure(summary["rows"])  # the plot's legend names each mode's lines
    try:
        labels = {line.get_label() for line in fig.axes[0].lines}
    finally:
        plt.close(fig)
    assert {f"sum of device fps ({mode})" for mode in MODES} <= labels
