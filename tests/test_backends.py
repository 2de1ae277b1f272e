"""Every backend in the table gives the same heatmaps on the same real crops."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import COCO_MINI, COCO_MINI_DETS, SHARED
from tasks.backends import BACKENDS, open_backend
from tasks.dataset import load_boxes, read_rgb
from tasks.pipeline import keypoints_for_batch, prepare_batch


@pytest.fixture(scope="module")
def real_batch(synthetic_coco):
    """16 real coco-mini crops (spread over its detections); synthetic ones in a clone without ../shared."""
    if SHARED.is_dir():
        box_set = load_boxes(str(COCO_MINI), str(COCO_MINI_DETS))
        boxes = box_set.boxes[::7][:16]
    else:
        box_set = load_boxes(synthetic_coco["dataroot"], synthetic_coco["dets"])
        boxes = box_set.boxes[:16]
    images = {i: read_rgb(box_set.image_paths[i]) for i in {b.image_id for b in boxes}}
    return prepare_batch(boxes, images)


def test_table_names_cpu_backends():
    assert {"torch", "onnxruntime"} <= set(BACKENDS)


def test_torch_and_onnxruntime_agree(real_batch, random_checkpoint, dynamic_onnx):
    torch_be = open_backend("torch", random_checkpoint, "cpu", 16, 2)
    ort_be = open_backend("onnxruntime", dynamic_onnx, "cpu", 16, 2)
    k_t, inf_t = keypoints_for_batch(torch_be, real_batch)
    k_o, inf_o = keypoints_for_batch(ort_be, real_batch)
    assert np.max(np.abs(inf_t.heatmaps - inf_o.heatmaps)) < 1e-3
    same = np.all(np.abs(k_t - k_o)[..., :2] < 1e-3, axis=-1)
    assert same.mean() >= 0.995
    assert inf_t.crops == inf_o.crops == 2 * len(real_batch.box_ids) and inf_t.calls == 2
    assert inf_t.device_seconds > 0 and inf_o.device_seconds > 0


def test_unknown_backend_is_one_line():
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'; choose one of"):
        open_backend("tensorrt", "x", "cpu", 1, 1)
