"""``--bs 1,4``: one run per batch size in one command, the summary files and plot, and ``report``.

The sweep runs once per module (two CPU workers, ONNX Runtime, small shards) and the
tests read its files back: every figure in the summary must be the one the run's own
metrics.json and throughput.json hold.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from conftest import REPO
from runner.report import PLOT_SIZE, compare, knee, load_runs, throughput_figure
from tasks.files import file_sha256

SIZES = (1, 4)
RUN_FILES = ("keypoints.json", "metrics.json", "throughput.json", "run.json", "devices.json")


def runner(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "runner", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"runner failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read(path: Path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, synthetic_coco, random_checkpoint, models_dir) -> dict:
    """A finished ``--bs 1,4 --devices cpu:2`` sweep of the synthetic set: its OUT, stdout, inputs, crops per bs.

    The sweep's numerics are a single run's (test_cli.py holds those against coco-mini),
    so real images here would only cost time: 236 crops per batch size instead of 36.
    """
    dataroot, dets, crops, shard = synthetic_coco["dataroot"], synthetic_coco["dets"], 36, "8"
    out = tmp_path_factory.mktemp("sweep") / "out"
    inputs = ["--dataroot", dataroot, "--dets", dets, "--weights", random_checkpoint, "--models-dir", models_dir]
    proc = runner(*inputs, "--bs", ",".join(map(str, SIZES)), "--devices", "cpu:2", "--backend", "onnxruntime",
                  "--shard-size", shard, "--out", str(out))
    return {"out": out, "stdout": proc.stdout, "crops": crops, "inputs": inputs, "dets": dets,
            "ckpt": random_checkpoint}


def test_sweep_writes_one_run_per_batch_size(sweep):
    out = sweep["out"]
    assert not (out / "keypoints.json").exists()  # a sweep's runs live in bs{N}/
    for bs in SIZES:
        for name in RUN_FILES:
            assert (out / f"bs{bs}" / name).is_file(), f"bs{bs}/{name}"
        assert (out / f"bs{bs}" / "journal" / "fingerprint.json").is_file()
        tp = read(out / f"bs{bs}" / "throughput.json")
        assert sum(d["crops"] for d in tp["devices"]) == sweep["crops"] == tp["totals"]["crops"]
        assert read(out / f"bs{bs}" / "journal" / "fingerprint.json")["bs"] == bs
    # Ray and the workers start once: the same processes ran every batch size.
    pids = [sorted(d["pid"] for d in read(out / f"bs{bs}" / "devices.json")) for bs in SIZES]
    assert pids[0] == pids[1] and len(pids[0]) == 2


def test_each_batch_size_has_its_report_and_the_sweep_an_index(sweep):
    from tasks.timeline import winning_boxes

    out = sweep["out"]
    for bs in SIZES:
        trace = read(out / f"bs{bs}" / "timeline.json")
        assert trace["otherData"]["bs"] == bs and winning_boxes(trace) == sweep["crops"] // 2
        assert len(read(out / f"bs{bs}" / "analysis.json")["joints"]) == 17
        assert "<h2>Timeline</h2>" in (out / f"bs{bs}" / "report.html").read_text()
        assert read(out / f"bs{bs}" / "run.json")["phases_seconds"]["report"] > 0
    index = (out / "report.html").read_text()
    assert [f'href="bs{bs}/report.html"' in index for bs in SIZES] == [True, True]
    assert index.count('<img src="data:image/png;base64,') == 1 and "://" not in index  # throughput.png inline
    assert f"Knee: bs={read(out / 'summary.json')['knee']['bs']}" in index


def test_summary_rows_are_the_runs_figures(sweep):
    out = sweep["out"]
    rows = read(out / "summary.json")["rows"]
    assert [r["bs"] for r in rows] == list(SIZES)
    for row in rows:
        metrics = read(out / f"bs{row['bs']}" / "metrics.json")
        tp = read(out / f"bs{row['bs']}" / "throughput.json")
        assert metrics["evaluated"] and row["mAP"] == metrics["AP"]
        assert row["backend"] == "onnxruntime" and row["model"] == "FastPose ResNet-50 256x192"
        assert row["device_fps"] == {d["id"]: d["device_fps"] for d in tp["devices"]}
        assert set(row["device_crops"]) == {"cpu:0", "cpu:1"}
        assert sum(row["device_crops"].values()) == sweep["crops"]
        for key in ("sum_device_fps", "e2e_boxes_per_s", "e2e_crops_per_s"):
            assert row[key] == tp["totals"][key]
        assert row["sum_device_fps"] == pytest.approx(sum(row["device_fps"].values()))
    with open(out / "summary.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["model", "backend", "bs", "mAP", "cpu:0 fps", "cpu:1 fps", "sum device fps",
                        "e2e boxes/s", "e2e crops/s", "outside window s"]
    assert [r[2] for r in table[1:]] == ["1", "4"]
    for r, row in zip(table[1:], rows):  # the driver's time outside each batch size's dispatch window
        phases = json.loads((Path(row["dir"]) / "run.json").read_text())["phases_seconds"]
        assert r[9] == f"{sum(phases.values()) - phases['dispatch_window']:.1f}" and phases["dispatch_window"] > 0
    assert [r[3] for r in table[1:]] == [f"{row['mAP']:.4f}" for row in rows]
    assert [r[6] for r in table[1:]] == [f"{row['sum_device_fps']:.1f}" for row in rows]
    md = (out / "summary.md").read_text()
    assert md.startswith("| model | backend | bs | mAP |") and md.count("\n| FastPose") == 2
    # The table is printed at the end.
    printed = sweep["stdout"].splitlines()
    head = next(i for i, line in enumerate(printed) if line.startswith("model ") and "sum device fps" in line)
    assert [line.split()[4] for line in printed[head + 2:head + 4]] == ["1", "4"]


def test_plot_decodes_at_its_size(sweep):
    image = cv2.imread(str(sweep["out"] / "throughput.png"))
    assert image is not None and image.shape == (PLOT_SIZE[1], PLOT_SIZE[0], 3)
    assert image.std() > 10  # something is drawn


def test_summary_names_the_knee(sweep):
    out = sweep["out"]
    summary = read(out / "summary.json")
    expected = knee(summary["rows"])
    assert summary["knee"] == expected and expected["bs"] in SIZES
    assert expected["best_e2e_crops_per_s"] == max(r["e2e_crops_per_s"] for r in summary["rows"])
    assert f"knee: bs {expected['bs']} (" in (out / "summary.md").read_text()
    assert f"knee: bs {expected['bs']} (" in sweep["stdout"]


def row(bs: int, e2e: float, fps: dict[str, float] | None = None) -> dict:
    """A summary row with what the knee and the plot read; ``fps`` per device, 0 for one that computed nothing."""
    fps = {"npu:0": e2e / 2, "npu:1": e2e / 2} if fps is None else fps
    return {"model": "m", "backend": "om", "precision": "force_fp16", "bs": bs, "mAP": None, "device_fps": fps,
            "device_crops": {d: (100 if v else 0) for d, v in fps.items()},
            "sum_device_fps": sum(fps.values()), "e2e_boxes_per_s": e2e / 2, "e2e_crops_per_s": e2e}


@pytest.mark.parametrize("e2e, knee_bs, best_bs", [
    ({1: 100.0, 4: 300.0, 8: 380.0, 16: 400.0, 32: 395.0}, 8, 16),   # 380 >= 0.95 * 400; 300 is not
    ({1: 100.0, 4: 379.9, 8: 400.0}, 8, 8),                           # just under 95%: not the knee
    ({1: 100.0, 4: 380.0, 8: 400.0}, 4, 8),                           # exactly 95% is within
    ({1: 50.0, 4: 200.0, 8: 200.0, 16: 200.0}, 4, 4),                 # a tie for best: the smallest
    ({16: 123.0}, 16, 16),                                            # a single run is its own knee
])
def test_knee_is_the_smallest_bs_within_5_percent_of_the_best(e2e, knee_bs, best_bs):
    rows = [row(bs, v) for bs, v in e2e.items()]
    point = knee(rows)
    assert (point["bs"], point["best_bs"], point["tolerance"]) == (knee_bs, best_bs, 0.05)
    assert point["e2e_crops_per_s"] == e2e[knee_bs] and point["best_e2e_crops_per_s"] == max(e2e.values())
    assert knee(list(reversed(rows))) == point  # the order of the rows does not matter
    assert knee([]) is None


def test_plot_is_log2_from_zero_with_every_device_and_the_knee():
    """Read back from the figure: a device absent at bs 4 (lost, or given no shard) is a 0 there."""
    import matplotlib.pyplot as plt

    rows = [row(1, 100.0), row(4, 390.0, {"npu:0": 390.0}), row(16, 400.0)]
    rows[1]["device_crops"]["npu:1"] = 0  # listed with no crops: computed nothing
    rows[1]["device_fps"]["npu:1"] = 7.0  # a figure from no crops is not drawn
    fig = throughput_figure(rows)
    try:
        (ax,) = fig.axes
        assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
        assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 400
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert {"npu:0 device fps", "npu:1 device fps"} <= set(lines)
        assert list(lines["npu:0 device fps"].get_xdata()) == [1, 4, 16]
        assert list(lines["npu:0 device fps"].get_ydata()) == [50.0, 390.0, 200.0]
        assert list(lines["npu:1 device fps"].get_ydata()) == [50.0, 0.0, 200.0]
        assert list(lines["sum of device fps"].get_ydata()) == [100.0, 390.0, 400.0]
        assert set(lines["knee: bs 4"].get_xdata()) == {4}  # 390 is within 5% of 400
        assert len([k for k in lines if k.endswith("device fps") and k != "sum of device fps"]) == 2
    finally:
        plt.close(fig)


def test_run_json_describes_the_run(sweep):
    run = read(sweep["out"] / "bs4" / "run.json")
    assert run["bs"] == 4 and run["config"]["bs"] == list(SIZES) and run["backend"] == "onnxruntime"  # the command's
    assert {"python", "runner", "torch", "onnxruntime", "ray", "numpy", "opencv"} <= set(run["versions"])
    assert run["weights_sha256"] == file_sha256(sweep["ckpt"])
    assert run["box_source_sha256"] == file_sha256(sweep["dets"]) and run["boxes"] == sweep["crops"] // 2
    assert [d["name"] for d in run["device_specs"]] == ["cpu", "cpu"] and "soc" in run["device_specs"][0]
    assert run["started"] <= run["finished"] and run["started_iso"].endswith("+00:00")
    assert {"device_fps", "e2e_boxes_per_s", "wall_seconds", "e2e window"} <= set(run["timing_scope"])


def test_report_rerenders_and_compares(sweep, tmp_path):
    """``report SWEEP SINGLE``: the summary again, and torch at bs 4 against the sweep per common bs."""
    saved = (sweep["out"] / "summary.md").read_text()
    (sweep["out"] / "summary.md").unlink()
    single = tmp_path / "torch-bs4"
    quiet = runner(*sweep["inputs"], "--bs", "4", "--devices", "cpu", "--backend", "torch", "--threads", "2",
                   "--out", str(single), "--quiet")
    assert quiet.stdout == "" and quiet.stderr == ""
    proc = runner("report", str(sweep["out"]), str(single))
    assert (sweep["out"] / "summary.md").read_text() == saved
    assert (single / "summary.md").is_file() and (single / "throughput.png").is_file()

    base = read(sweep["out"] / "bs4" / "throughput.json")["totals"]
    other = read(single / "throughput.json")["totals"]
    map_diff = read(single / "metrics.json")["AP"] - read(sweep["out"] / "bs4" / "metrics.json")["AP"]
    rows = compare(load_runs(sweep["out"]), load_runs(single))
    assert [r["bs"] for r in rows] == [4]
    assert rows[0]["mAP_diff"] == pytest.approx(map_diff, abs=1e-12)
    assert rows[0]["sum_device_fps_ratio"] == pytest.approx(other["sum_device_fps"] / base["sum_device_fps"])
    assert rows[0]["e2e_boxes_per_s_ratio"] == pytest.approx(other["e2e_boxes_per_s"] / base["e2e_boxes_per_s"])
    lines = proc.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("torch-bs4 [torch, 1 devices] vs out [onnxruntime, 2 devices]"))
    line = next(ln for ln in lines[start:] if ln.split()[:1] == ["4"])
    assert line.split()[3:] == [f"{map_diff:+.4f}", f"{other['sum_device_fps'] / base['sum_device_fps']:.3f}",
                                f"{other['e2e_boxes_per_s'] / base['e2e_boxes_per_s']:.3f}"]
    # Per joint, torch's coco-analyze classes against ONNX Runtime's, in comparison.json and as a table.
    from tasks.keypoint_errors import diff_analyses

    want = diff_analyses(read(sweep["out"] / "bs4" / "analysis.json"), read(single / "analysis.json"))
    assert read(single / "comparison.json")["rows"][0]["keypoint_errors"] == json.loads(json.dumps(want))
    start = next(i for i, ln in enumerate(lines) if ln.startswith("bs 4: per joint, other - base"))
    assert [ln.split()[0] for ln in lines[start + 3:start + 20]] == list(want["joints"])


def test_resume_continues_per_batch_size(sweep, tmp_path):
    """A sweep cut off after bs 1: --resume keeps bs 1 as it was and runs bs 4."""
    out = tmp_path / "out"
    shutil.copytree(sweep["out"], out)
    shutil.rmtree(out / "bs4")
    kept = (out / "bs1" / "run.json").read_bytes()
    proc = runner(*sweep["inputs"], "--bs", "1,4", "--devices", "cpu:2", "--backend", "onnxruntime",
                  "--shard-size", "8", "--out", str(out), "--resume")
    assert "bs 1: finished before, kept" in proc.stdout
    assert (out / "bs1" / "run.json").read_bytes() == kept
    assert (out / "bs4" / "keypoints.json").read_bytes() == (sweep["out"] / "bs4" / "keypoints.json").read_bytes()
    assert [r["bs"] for r in read(out / "summary.json")["rows"]] == [1, 4]


def test_sweep_preset_is_the_reference_sizes():
    from runner.config import load_config

    assert load_config(str(REPO / "configs" / "sweep.yaml")).bs == (1, 4, 8, 16, 32, 64)
    assert load_config(str(REPO / "configs" / "sweep.yaml"), {"bs": "2,8"}).bs == (2, 8)


def test_report_compares_keypoints_box_by_box(tmp_path):
    """``report A B`` of two sim runs, B's keypoints.json moved by known amounts: the figures
    in the table and in B/comparison.json are the ones computed here."""
    import math

    base, other = tmp_path / "a", tmp_path / "b"
    runner("--synthetic", "16", "--backend", "sim", "--bs", "4", "--out", str(base), "--quiet")
    shutil.copytree(base, other)
    results = read(base / "keypoints.json")
    moved = json.loads(json.dumps(results))
    for k in range(17):
        moved[0]["keypoints"][3 * k] += 0.25  # every joint's x: within 0.5 px, not 1e-3
    moved[1]["keypoints"][3 * 2 + 1] += 1.5  # one joint's y: beyond both
    moved[2]["score"] += 0.125
    dropped = moved.pop()  # the base's last result has no partner
    (other / "keypoints.json").write_text(json.dumps(moved))

    sigmas = [.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]

    def oks(a: dict, b: dict) -> float:
        area = a["bbox"][2] * a["bbox"][3]
        d2 = [(a["keypoints"][3 * k] - b["keypoints"][3 * k]) ** 2
              + (a["keypoints"][3 * k + 1] - b["keypoints"][3 * k + 1]) ** 2 for k in range(17)]
        return sum(math.exp(-d / (2 * s / 10) ** 2 / (area + 2.0 ** -52) / 2) for d, s in zip(d2, sigmas)) / 17

    n = len(results) - 1
    assert n == 15 and dropped == results[-1] and results[-1] != results[0]
    want = {"matched": n, "unmatched_a": 1, "unmatched_b": 0, "max_abs_px": 1.5,
            "frac_within_1e-3px": (17 * n - 18) / (17 * n), "frac_within_0.5px": (17 * n - 1) / (17 * n),
            "max_abs_score": 0.125, "max_abs_joint_score": 0.0}
    mean_oks = sum(oks(a, b) for a, b in zip(results, moved)) / n

    proc = runner("report", str(base), str(other))
    rows = read(other / "comparison.json")["rows"]
    assert [r["bs"] for r in rows] == [4]
    got = rows[0]["keypoints"]
    assert {k: got[k] for k in want} == want
    assert got["mean_oks"] == pytest.approx(mean_oks, rel=1e-12) and mean_oks < 1.0
    assert rows[0]["sum_device_fps_ratio"] == 1.0  # the same throughput.json
    lines = proc.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("keypoints box by box"))
    row = next(ln for ln in lines[start:] if ln.split()[:1] == ["4"])
    assert row.split() == ["4", str(n), "1", "0", "1.5", f"{want['frac_within_1e-3px']:.4f}",
                           f"{want['frac_within_0.5px']:.4f}", "0.125", f"{mean_oks:.6f}"]


def test_om_batch_is_static_by_default_and_dynamic_needs_two_sizes():
    from runner.config import ConfigError, load_config

    assert load_config().model.om_batch == "static"
    assert load_config(None, {"om_batch": "dynamic", "backend": "om", "bs": "1,4,8"}).model.om_batch == "dynamic"
    with pytest.raises(ConfigError, match="om_batch dynamic with bs 4: ATC builds a dynamic-batch OM for 2 to 100"):
        load_config(None, {"om_batch": "dynamic", "backend": "om", "bs": "4"})
    with pytest.raises(ConfigError, match="om_batch dynamic with bs 1,2,.*,101: ATC builds"):  # auto may mean om
        load_config(None, {"om_batch": "dynamic", "bs": ",".join(map(str, range(1, 102)))})
    with pytest.raises(ConfigError, match="om_batch: 'gears' is not static or dynamic"):
        load_config(None, {"om_batch": "gears"})
