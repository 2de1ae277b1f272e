"""AlphaPose.patch: a unified diff against upstream AlphaPose at the reference commit
(ddaf4b99327132f7617a768a75f7cb94870ed57c), applied as docs/alphapose-side-by-side.md says."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

PATCH = Path(__file__).resolve().parents[1] / "AlphaPose.patch"
ALPHAPOSE_DIR = os.environ.get("ALPHAPOSE_DIR")


def _git_apply(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "apply", *args, str(PATCH)], cwd=cwd, capture_output=True, text=True)


def test_patch_parses_and_touches_only_the_expected_files():
    numstat = _git_apply("--numstat", cwd=PATCH.parent)
    assert numstat.returncode == 0, numstat.stderr
    files = {line.split("\t")[2] for line in numstat.stdout.splitlines()}
    assert files == {
        "alphapose/datasets/coco_det.py",            # images from the cfg ROOT, not ./data/coco
        "alphapose/models/fastpose.py",              # no ImageNet download when offline
        "alphapose/models/layers/ShuffleResnet.py",  # DCN extension optional
        "alphapose/utils/presets/simple_transform.py",  # roi_align extension optional
        "alphapose/utils/transforms.py",             # flip_heatmap: clean one-column shift
        "detector/nms/nms_torch.py",                 # pure-torch nms_cpu stand-in
        "detector/nms/nms_wrapper.py",
        "scripts/validate.py",                       # --dataroot, --det-file, CPU
    }
    text = PATCH.read_text()
    assert "+            out[:, :, :, 1:] = out[:, :, :, 0:-1].clone()" in text


@pytest.mark.skipif(not ALPHAPOSE_DIR, reason="set ALPHAPOSE_DIR to an upstream AlphaPose checkout "
                                              "at ddaf4b99327132f7617a768a75f7cb94870ed57c")
def test_patch_applies_to_upstream_checkout():
    root = Path(ALPHAPOSE_DIR)
    assert (root / "scripts" / "validate.py").is_file(), f"{root} is not an AlphaPose checkout"
    check = _git_apply("--check", cwd=root)
    assert check.returncode == 0, check.stderr
