"""Fixtures shared by the suite. Reference data lives in ../shared beside the repo;
a user's clone has none, so tests that need it skip with the reason, and the
suite makes its own small COCO-style set for the rest."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO_MINI = SHARED / "data" / "coco-mini"
COCO_MINI_DETS = COCO_MINI / "detections" / "person_detection_results.json"
SUBSET79 = SHARED / "data" / "coco-val2017-subset79"

requires_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason="../shared (reference data) is absent: a user's clone has none")


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> str:
    """A seeded random FastPose saved as a plain state_dict, the released file's layout."""
    import torch

    from tasks.model import build_fastpose

    path = tmp_path_factory.mktemp("ckpt") / "fastpose-random-seed0.pth"
    torch.save(build_fastpose(seed=0).state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory) -> dict:
    """12 synthetic persons on 3 images, with GT keypoints and a detection file."""
    from tasks.synthetic import write_synthetic_coco

    return write_synthetic_coco(tmp_path_factory.mktemp("synthetic"), 12, seed=3)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def dynamic_onnx(random_checkpoint, models_dir) -> str:
    """The random checkpoint exported with a dynamic batch (verified against PyTorch)."""
    from tasks.export import ExportOptions, export_onnx

    crops = np.random.default_rng(0).integers(0, 256, (2, 256, 192, 3), dtype=np.uint8)
    return str(export_onnx(random_checkpoint, models_dir, ExportOptions(batch_size=None), crops))


@pytest.fixture
def data(synthetic_coco, random_checkpoint, models_dir) -> dict:
    """The synthetic set, its checkpoint, and the keypoints a run without Ray gives (Ray tests)."""
    from ray_support import reference_keypoints
    from tasks.dataset import load_boxes

    box_ids = sorted(b.id for b in load_boxes(synthetic_coco["dataroot"], synthetic_coco["dets"]).boxes)
    expected = reference_keypoints(synthetic_coco["dataroot"], synthetic_coco["dets"], random_checkpoint)
    return {"coco": synthetic_coco, "ckpt": random_checkpoint, "models": models_dir, "box_ids": box_ids,
            "expected": expected}


@pytest.fixture(scope="session")
def exported(random_checkpoint, models_dir):
    """``exported(dst, *options)``: ``dst`` as a ``--models-dir`` holding the random checkpoint under the
    name ``--synthetic`` gives it and its ONNX for each ExportOptions, and nothing else (no OM).

    Each export is made once per session in ``models_dir`` and hard-linked: a test that
    counts ATC runs or sessions gets a fresh cache of those, without paying ~5 s of
    PyTorch export per model again (``--synthetic``'s checkpoint is this one, byte for byte).
    """
    import os

    from tasks.export import export_onnx, onnx_path_for

    crops = np.random.default_rng(0).integers(0, 256, (4, 256, 192, 3), dtype=np.uint8)

    def make(dst: Path, *options) -> Path:
        dst.mkdir(parents=True, exist_ok=True)
        os.link(random_checkpoint, dst / "fastpose-random-seed0.pth")
        for option in options:
            onnx = export_onnx(random_checkpoint, models_dir, option, crops)
            for path in (onnx, onnx.with_suffix(".json")):
                os.link(path, dst / path.name)
            assert onnx_path_for(str(dst / "fastpose-random-seed0.pth"), str(dst), option).name == onnx.name
        return dst

    return make
