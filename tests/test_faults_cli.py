"""Faults and bad input through the real CLI (issue 7): nothing is lost, every error is one clear line.

Each case runs ``python -m runner`` in a subprocess and checks what the user sees:
the exit status, exactly one ``error: ...`` line on stderr naming the file or field
and the fix, no traceback, and nothing half-written in OUT (no keypoints.json after a
failed run, no ``.tmp`` files ever). README.md "Troubleshooting" has the same table.

Cases 1-3 (a worker SIGKILLed, every worker lost then --resume, Ctrl-C then --resume)
are in tests/test_faults_ray.py. Runs that get as far as inference use the torch
backend, a handful of synthetic boxes and one CPU worker; the others fail before Ray
starts and cost only the process start.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED

FAKES = REPO / "tests" / "fakes"
NPU_SMI_ERRORS = sorted((SHARED / "fixtures" / "npu-smi").glob("err_*.txt"))


# ---------------------------------------------------------------- helpers


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASCEND_", "FAKE_", "RAY_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def runner(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, env=env or base_env(),
                          capture_output=True, text=True, timeout=300)


def no_leftovers(out: Path) -> None:
    """Atomic writes: no temporary file is ever left in OUT."""
    if out.is_dir():
        tmp = [str(p) for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
        assert not tmp, tmp


def without_ray_npu_noise(stderr: str) -> str:
    """Ray's own log when it starts NPU slots on a host without pyACL (``import acl`` fails):
    an ERROR line and its traceback, once per process, from Ray itself, not from runner.
    A CANN host (set_env.sh sourced) has acl and does not print it."""
    kept, skipping = [], False
    for line in stderr.splitlines():
        if "ERROR npu.py" in line and "Failed to detect NPU type" in line:
            skipping = True
        elif skipping and line.startswith("ModuleNotFoundError: No module named 'acl'"):
            skipping = False
        elif not skipping:
            kept.append(line)
    return "\n".join(kept)


def one_error(proc: subprocess.CompletedProcess, out: Path | None, *needles: str, code: int = 2,
              stderr: str | None = None) -> str:
    """The run failed with exactly one ``error:`` line holding every needle, and wrote no results."""
    stderr = proc.stderr if stderr is None else stderr
    assert proc.returncode == code, f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and stderr.strip() == errors[0], stderr[-3000:]  # that line and nothing else
    line = errors[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    if out is not None:
        for name in ("keypoints.json", "metrics.json", "throughput.json", "run.json"):
            assert not (out / name).exists(), name
        no_leftovers(out)
    return line


def completed(proc: subprocess.CompletedProcess, out: Path) -> dict:
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    no_leftovers(out)
    assert (out / "keypoints.json").is_file()
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture
def coco(tmp_path, synthetic_coco) -> dict:
    """A private copy of the synthetic set (3 images, 18 detections): cases damage it."""
    root = tmp_path / "coco"
    shutil.copytree(synthetic_coco["dataroot"], root)
    ann = json.loads((root / "annotations" / "person_keypoints_val2017.json").read_text())
    images = [str(root / "val2017" / im["file_name"]) for im in ann["images"]]
    return {"root": root, "dets": root / "detections" / "dets.json", "images": images,
            "image_ids": [im["id"] for im in ann["images"]]}


def write_dets(path: Path, dets) -> str:
    path.write_text(dets if isinstance(dets, str) else json.dumps(dets))
    return str(path)


def small_dets(coco: dict, per_image: int = 2) -> list[dict]:
    """The first ``per_image`` detections of each image: few crops, every image used."""
    dets, seen = [], {}
    for d in json.loads(coco["dets"].read_text()):
        if seen.get(d["image_id"], 0) < per_image:
            seen[d["image_id"]] = seen.get(d["image_id"], 0) + 1
            dets.append(d)
    return dets


def run_args(coco: dict, dets: str, weights: str, out: Path, models: str, *extra: str) -> list[str]:
    return ["--dataroot", str(coco["root"]), "--dets", dets, "--weights", weights, "--backend", "torch",
            "--devices", "cpu", "--threads", "2", "--bs", "4", "--out", str(out), "--models-dir", models,
            *extra]


# ---------------------------------------------------------------- 4, 5: images


def test_missing_image_stops_before_the_run(tmp_path, coco, random_checkpoint, models_dir):
    gone = coco["images"][1]
    os.remove(gone)
    out = tmp_path / "out"
    proc = runner(*run_args(coco, str(coco["dets"]), random_checkpoint, out, models_dir), cwd=tmp_path)
    one_error(proc, out, gone, "image not found", "1 of 3 images missing", "--skip-missing-images")
    assert "boxes in" not in proc.stdout  # nothing started


def test_missing_image_skipped_with_flag_is_counted_and_incomplete(tmp_path, coco, random_checkpoint, models_dir):
    gone = coco["images"][1]
    os.remove(gone)
    dets = write_dets(tmp_path / "dets.json", small_dets(coco))
    out = tmp_path / "out"
    proc = runner(*run_args(coco, dets, random_checkpoint, out, models_dir, "--skip-missing-images"), cwd=tmp_path)
    metrics = completed(proc, out)
    assert metrics["complete"] is False and metrics["skipped"] == 2 and metrics["boxes"] == 6
    assert {s["reason"] for s in metrics["skipped_boxes"]} == {f"{gone}: image not found"}
    assert len(json.loads((out / "keypoints.json").read_text())) == metrics["results"] == 4
    assert "INCOMPLETE: 2 boxes skipped" in proc.stdout


def test_truncated_jpeg_boxes_are_skipped_with_the_reason(tmp_path, coco, random_checkpoint, models_dir):
    """Policy: found when the worker reads the image (the end-of-image check in read_rgb);
    the run goes on without its boxes, which metrics.json lists; mAP marked INCOMPLETE."""
    bad = Path(coco["images"][0])
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2])
    dets = write_dets(tmp_path / "dets.json", small_dets(coco))
    out = tmp_path / "out"
    proc = runner(*run_args(coco, dets, random_checkpoint, out, models_dir), cwd=tmp_path)
    metrics = completed(proc, out)
    assert metrics["complete"] is False and metrics["skipped"] == 2
    assert {s["reason"] for s in metrics["skipped_boxes"]} == {f"{bad}: truncated JPEG (no end-of-image marker)"}
    assert {s["image_id"] for s in metrics["skipped_boxes"]} == {coco["image_ids"][0]}
    assert metrics["results"] == 4 and "INCOMPLETE: 2 boxes skipped" in proc.stdout


# ---------------------------------------------------------------- 6-9: the detection file


def test_detection_file_not_json(tmp_path, coco, random_checkpoint, models_dir):
    dets = write_dets(tmp_path / "dets.json", '[{"image_id": 1000, "bbox": [1, 2, 3')
    out = tmp_path / "out"
    proc = runner(*run_args(coco, dets, random_checkpoint, out, models_dir), cwd=tmp_path)
    one_error(proc, out, dets, "detection file is not valid JSON", "re-download")


@pytest.mark.parametrize("dets, needles", [
    ({"image_id": 1000}, ["a detection file is a JSON list of {image_id, category_id, bbox", "got dict"]),
    ([[1000, [1, 2, 3, 4], 0.9]], ["entry 0 is not an object"]),
    ([{"image_id": 1000, "score": 0.9}], ["entry 0 lacks bbox", "COCO results format"]),
    ([{"bbox": [1, 2, 30, 40]}], ["entry 0 lacks image_id, score"]),
    ([{"image_id": 1000, "bbox": [1, 2, 30, 40], "score": "high"}], ["entry 0: score 'high' is not a number"]),
    ([{"image_id": [1000], "bbox": [1, 2, 30, 40], "score": 0.9}], ["entry 0: image_id [1000] is not an integer"]),
    ([{"image_id": 1000, "category_id": 2, "bbox": [1, 2, 30, 40], "score": 0.9}],
     ["category_id 2", "filter the file first"]),
], ids=["not-a-list", "entry-not-object", "no-bbox", "no-image-id-score", "score-string", "image-id-list",
        "not-person"])
def test_detection_fields_missing_or_mistyped(tmp_path, coco, random_checkpoint, models_dir, dets, needles):
    path = write_dets(tmp_path / "dets.json", dets)
    out = tmp_path / "out"
    proc = runner(*run_args(coco, path, random_checkpoint, out, models_dir), cwd=tmp_path)
    one_error(proc, out, path, *needles)


def test_invalid_boxes_skipped_and_far_outside_boxes_run(tmp_path, coco, random_checkpoint, models_dir):
    """Zero/negative size, NaN, infinite, not 4 numbers: skipped with the reason and counted.
    A box far outside the image runs as upstream runs it (a crop of padding) and yields a result."""
    good = small_dets(coco, per_image=1)
    image = coco["image_ids"][0]
    bad = [
        {"image_id": image, "category_id": 1, "bbox": [10, 10, 0, 50], "score": 0.9},
        {"image_id": image, "category_id": 1, "bbox": [10, 10, 40, -5], "score": 0.9},
        {"image_id": image, "category_id": 1, "bbox": [math.nan, 10, 40, 50], "score": 0.9},
        {"image_id": image, "category_id": 1, "bbox": [10, 10, 40, 50], "score": math.inf},
        {"image_id": image, "category_id": 1, "bbox": [10, 10, 40], "score": 0.9},
    ]
    far = {"image_id": image, "category_id": 1, "bbox": [50000.0, -30000.0, 80.0, 160.0], "score": 0.8}
    dets = write_dets(tmp_path / "dets.json", good + bad + [far])
    out = tmp_path / "out"
    proc = runner(*run_args(coco, dets, random_checkpoint, out, models_dir), cwd=tmp_path)
    metrics = completed(proc, out)
    assert metrics["boxes"] == 9 and metrics["skipped"] == 5 and metrics["complete"] is False
    assert [s["box_index"] for s in metrics["skipped_boxes"]] == [3, 4, 5, 6, 7]
    assert [s["reason"] for s in metrics["skipped_boxes"]] == [
        "bbox has zero or negative width or height", "bbox has zero or negative width or height",
        "bbox has NaN or infinite values", "score is NaN or infinite", "bbox is not 4 numbers [x, y, w, h]"]
    assert metrics["results_before_nms"] == 4  # 3 good + the far one
    results = json.loads((out / "keypoints.json").read_text())
    far_results = [r for r in results if all(math.isfinite(v) for v in r["keypoints"])
                   and r["keypoints"][0] > 10000]
    assert len(far_results) == 1 and far_results[0]["image_id"] == image


def test_image_ids_absent_from_annotations(tmp_path, coco, random_checkpoint, models_dir):
    dets = small_dets(coco) + [{"image_id": 424242, "category_id": 1, "bbox": [1, 2, 30, 40], "score": 0.9},
                               {"image_id": "000000777.jpg", "category_id": 1, "bbox": [1, 2, 30, 40], "score": 0.9}]
    path = write_dets(tmp_path / "dets.json", dets)
    out = tmp_path / "out"
    proc = runner(*run_args(coco, path, random_checkpoint, out, models_dir), cwd=tmp_path)
    one_error(proc, out, path, "2 detections refer to 2 image ids not in the annotation file", "e.g. 777, 424242",
              "use the detection file made for this annotation set")


# ---------------------------------------------------------------- 10-12: the checkpoint


def _another_model(path: Path) -> str:
    import torch

    torch.save({"backbone.conv.weight": torch.zeros(8, 3, 3, 3), "head.fc.bias": torch.zeros(10)}, path)
    return str(path)


def _misshaped(path: Path, good: str) -> str:
    import torch

    state = torch.load(good, weights_only=True)
    state["conv_out.weight"] = torch.zeros(14, 128, 3, 3)  # a 14-joint model
    state["conv_out.bias"] = torch.zeros(14)
    torch.save(state, path)
    return str(path)


def _truncated(path: Path, good: str) -> str:
    data = Path(good).read_bytes()
    path.write_bytes(data[:len(data) // 3])
    return str(path)


@pytest.mark.parametrize("make, needles", [
    (lambda p, good: _another_model(p), ["not a FastPose-R50 checkpoint", "missing", "unexpected: backbone.conv",
                                         "fast_res50_256x192.pth"]),
    (_misshaped, ["not a FastPose-R50 checkpoint", "2 mis-shaped: conv_out.weight [14, 128, 3, 3]!=[17, 128, 3, 3]",
                  "fast_res50_256x192.pth"]),
    (_truncated, ["cannot be read as a checkpoint (truncated or not a torch file)", "download it again"]),
], ids=["another-model", "wrong-shapes", "truncated"])
def test_bad_checkpoint_is_one_line(tmp_path, coco, random_checkpoint, models_dir, make, needles):
    weights = make(tmp_path / "bad.pth", random_checkpoint)
    dets = write_dets(tmp_path / "dets.json", small_dets(coco, 1))
    out = tmp_path / "out"
    proc = runner(*run_args(coco, dets, weights, out, models_dir), cwd=tmp_path)
    line = one_error(proc, out, weights, *needles)
    assert line.startswith(f"error: {weights}: ")  # checked by the driver, before any worker starts
    assert "boxes in" not in proc.stdout


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_would_run_code_is_refused(tmp_path, coco, models_dir):
    import torch

    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pth"
    torch.save({"conv_out.weight": torch.zeros(1), "payload": _RunsCode(str(marker))}, weights)
    assert not marker.exists()
    dets = write_dets(tmp_path / "dets.json", small_dets(coco, 1))
    out = tmp_path / "out"
    proc = runner(*run_args(coco, dets, str(weights), out, models_dir), cwd=tmp_path)
    one_error(proc, out, str(weights), "refused", "could run code", "weights_only")
    assert "boxes in" not in proc.stdout
    assert not marker.exists()  # the payload never ran


def _darknet_weights(path: Path) -> str:
    """A file shaped like Darknet's yolov3-spp.weights: int32 0, 2, 0, an int64 'seen', float32s."""
    import numpy as np

    path.write_bytes(np.array([0, 2, 0], "<i4").tobytes() + np.array([32_013_312], "<u8").tobytes()
                     + np.random.default_rng(0).random(1000).astype("<f4").tobytes())
    return str(path)


def test_darknet_weights_given_as_weights_point_at_detector_weights(tmp_path, coco, models_dir):
    weights = _darknet_weights(tmp_path / "yolov3-spp.weights")
    dets = write_dets(tmp_path / "dets.json", small_dets(coco, 1))
    out = tmp_path / "out"
    proc = runner(*run_args(coco, dets, weights, out, models_dir), cwd=tmp_path)
    line = one_error(proc, out, weights, "not a torch checkpoint", "looks like Darknet weights",
                     "version 0.2.0, 1,000 float32 values", "give it to --detector-weights",
                     "fast_res50_256x192.pth to --weights")
    assert line.startswith(f"error: {weights}: ") and "could run code" not in line
    assert "boxes in" not in proc.stdout


def test_file_neither_torch_nor_darknet_given_as_weights_is_not_a_torch_checkpoint(tmp_path, coco, models_dir):
    weights = str(tmp_path / "image.pth")
    shutil.copy(coco["images"][0], weights)  # a JPEG: neither torch.save's zip nor its pickle
    dets = write_dets(tmp_path / "dets.json", small_dets(coco, 1))
    out = tmp_path / "out"
    proc = runner(*run_args(coco, dets, weights, out, models_dir), cwd=tmp_path)
    line = one_error(proc, out, weights, "not a torch checkpoint (neither the zip archive nor the pickle",
                     "fast_res50_256x192.pth")
    assert "Darknet" not in line and "could run code" not in line


# ---------------------------------------------------------------- 13, 14: devices


def _fake_npu_smi(bin_dir: Path, stderr_text: str | None = None, status: int = 1) -> Path:
    """The repo's fake npu-smi (two 310P3 chips), or one that prints ``stderr_text`` and fails."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "npu-smi"
    if stderr_text is None:
        shutil.copy(FAKES / "bin" / "npu-smi", script)
    else:
        (bin_dir / "err.txt").write_text(stderr_text)
        script.write_text(f'#!/bin/sh\ncat "{bin_dir}/err.txt" >&2\nexit {status}\n')
    script.chmod(0o755)
    return bin_dir


def _path_with(bin_dir: Path) -> dict[str, str]:
    return base_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_npu_id_not_present(tmp_path, models_dir):
    env = _path_with(_fake_npu_smi(tmp_path / "bin"))
    out = tmp_path / "out"
    proc = runner("--synthetic", "2", "--devices", "5", "--out", str(out), "--models-dir", models_dir,
                  cwd=tmp_path, env=env)
    one_error(proc, out, "--devices 5: NPU 5 not found; present: 0, 1 (Ascend310P3)")


def test_cuda_id_on_a_host_without_gpus(tmp_path, models_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    out = tmp_path / "out"
    proc = runner("--synthetic", "2", "--devices", "cuda:3", "--out", str(out), "--models-dir", models_dir,
                  cwd=tmp_path)
    one_error(proc, out, "--devices cuda:3: no GPU found", "torch.cuda.is_available() is False")


HAND_WRITTEN_NPU_SMI_ERROR = ("DrvMngGetConsoleLogLevel failed. (g_conLogLevel=3)\n"
                              "Error: the driver version is incompatible with this npu-smi (code 0x3)\n")


@pytest.mark.parametrize("capture", NPU_SMI_ERRORS or [None], ids=lambda p: p.stem if p else "none")
def test_npu_smi_error_captures(tmp_path, models_dir, capture):
    if capture is None:
        pytest.skip("../shared/fixtures/npu-smi (real npu-smi error captures) is absent: a user's clone has none")
    env = _path_with(_fake_npu_smi(tmp_path / "bin", capture.read_text()))
    out = tmp_path / "out"
    proc = runner("--synthetic", "2", "--devices", "0", "--out", str(out), "--models-dir", models_dir,
                  cwd=tmp_path, env=env)
    last = [ln for ln in capture.read_text().splitlines() if ln.strip()][-1]
    one_error(proc, out, "--devices 0: npu-smi unavailable:", last.strip(), "use --devices cpu")


def test_npu_smi_unknown_error_text(tmp_path, models_dir):
    env = _path_with(_fake_npu_smi(tmp_path / "bin", HAND_WRITTEN_NPU_SMI_ERROR, status=3))
    out = tmp_path / "out"
    proc = runner("--synthetic", "2", "--devices", "0,1", "--out", str(out), "--models-dir", models_dir,
                  cwd=tmp_path, env=env)
    one_error(proc, out, "--devices 0,1: npu-smi unavailable: exit status 3", "DrvMngGetConsoleLogLevel failed",
              "check the Ascend driver install", "use --devices cpu")


# ---------------------------------------------------------------- 15: OUT


def test_out_that_cannot_be_written(tmp_path, models_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "out"
    proc = runner("--synthetic", "2", "--out", str(out), "--models-dir", models_dir, cwd=tmp_path)
    one_error(proc, None, str(out), "cannot write results there (Not a directory)", "choose another --out")
    assert blocker.read_text() == "not a directory"


# ---------------------------------------------------------------- 16: an OM of another batch


def test_om_of_another_batch_is_one_line(tmp_path, coco, random_checkpoint, exported):
    """The cached OM for --bs 4 was in fact built for batch 8 (a file copied over it)."""
    import numpy as np

    from fakes.fake_om import read_header, rewrite_header
    from tasks.atc import convert_to_om
    from tasks.export import ExportOptions, export_onnx

    models = exported(tmp_path / "models", ExportOptions(batch_size=4))
    crops = np.random.default_rng(0).integers(0, 256, (1, 256, 192, 3), dtype=np.uint8)
    onnx = export_onnx(random_checkpoint, str(models), ExportOptions(batch_size=4), crops)
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{FAKES / 'bin'}{os.pathsep}{path}"
    try:
        om = convert_to_om(onnx, models, "Ascend310P3", batch_size=4)
    finally:
        os.environ["PATH"] = path
    shape = read_header(om)["input_shape"]
    rewrite_header(om, input_shape=[8, *shape[1:]])  # an OM built for another batch

    env = base_env(PATH=f"{FAKES / 'bin'}{os.pathsep}{os.environ['PATH']}",
                   PYTHONPATH=os.pathsep.join([str(FAKES), str(REPO)]), FAKE_AIS_BENCH_API="new",
                   FAKE_ASCEND_SOC="Ascend310P3")
    dets = write_dets(tmp_path / "dets.json", small_dets(coco, 1))
    out = tmp_path / "out"
    args = run_args(coco, dets, random_checkpoint, out, str(models))
    args[args.index("--backend") + 1], args[args.index("--devices") + 1] = "om", "0"
    proc = runner(*args, cwd=tmp_path, env=env)
    line = one_error(proc, out, f"--bs 4 but OM {om.name} was built for batch 8", "run with --bs 8",
                     stderr=without_ray_npu_noise(proc.stderr))
    assert line.startswith("error: a device worker failed to start: --bs 4 but OM "), line


# ---------------------------------------------------------------- an OpenCV whose warp is not the crop's rule


#: Put first on PYTHONPATH, every Python process of the run (the driver, Ray's workers) imports this:
#: the installed warpAffine, one pixel of each result one grey level off.
OFF_BY_ONE_WARP = '''
import cv2

_warp = cv2.warpAffine


def warpAffine(*args, **kwargs):
    out = _warp(*args, **kwargs).copy()
    out.flat[0] = out.flat[0] + 1 if out.flat[0] < 255 else 254
    return out


cv2.warpAffine = warpAffine
'''


def test_an_opencv_whose_warp_differs_stops_the_run_unless_allowed(tmp_path, models_dir):
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(OFF_BY_ONE_WARP)
    env = base_env(PYTHONPATH=os.pathsep.join([str(patch), str(REPO)]), XDG_CACHE_HOME=str(tmp_path / "cache"))
    common = ("--synthetic", "8", "--backend", "sim", "--bs", "4", "--models-dir", models_dir)
    out = tmp_path / "out"
    proc = runner(*common, "--out", str(out), cwd=tmp_path, env=env)
    line = one_error(proc, out, "a device worker failed to start: OpenCV ", "warpAffine differs from the "
                     "fixed-point rule", "install the pinned opencv-python-headless==", "--allow-opencv-mismatch")
    import cv2

    assert f"OpenCV {cv2.__version__}" in line
    allowed = tmp_path / "allowed"
    done = completed(runner(*common, "--allow-opencv-mismatch", "--out", str(allowed), cwd=tmp_path, env=env),
                     allowed)
    run = json.loads((allowed / "run.json").read_text())
    assert run["config"]["allow_opencv_mismatch"] is True and done is not None
    assert [d["opencv_warp_mismatch"] for d in run["devices"]] == [line.split("start: ", 1)[1]]
