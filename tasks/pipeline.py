"""The path of a batch of boxes: image -> crop -> network (normal and mirrored) -> keypoints.

Per-box work is a pure function of (image, box), so it runs the same in one
process or in any number of device actors.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tasks.backends.base import Backend
from tasks.dataset import Box
from tasks.decode import decode_keypoints, flip_merge
from tasks.variant import Variant
from tasks.spec import FASTPOSE
from tasks.transforms import (box_xywh_to_center_scale, center_scale_to_crop_box, crop_rgb,
                              crops_to_input, flip_crops, flip_input)


def crop_for_box(image_rgb: np.ndarray, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``[256, 192, 3]`` crop and its float32 crop box ``[x1, y1, x2, y2]``."""
    center, scale = box_xywh_to_center_scale(box.xywh)
    return crop_rgb(image_rgb, center, scale), center_scale_to_crop_box(center, scale)


@dataclass
class PreparedBatch:
    box_ids: np.ndarray  # int64 [n]
    crops: np.ndarray  # uint8 [n, 256, 192, 3]
    crop_boxes: np.ndarray  # float32 [n, 4]


def prepare_batch(boxes: list[Box], images: dict[int, np.ndarray]) -> PreparedBatch:
    """Crops of ``boxes``; ``images`` maps image id -> RGB image for every box."""
    pairs = [crop_for_box(images[b.image_id], b) for b in boxes]
    return PreparedBatch(np.array([b.id for b in boxes], dtype=np.int64),
                         np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))


def network_inputs(crops: np.ndarray, variant: Variant, flip: bool = True,
                   empty: Callable[[tuple, type], np.ndarray] | None = None) -> list[np.ndarray]:
    """What the backend is handed, one array per call: host work, done before the device.

    Float models get the normalised input (and its mirror for the flip test); a
    uint8 model the crops as cut (and theirs); a fused-flip model one array, which
    it mirrors itself. ``empty(shape, dtype)``, when given, makes each array where it
    is to lie (a shared slot: cluster.host_work), so nothing is copied there after.
    """
    if variant.fused_flip and not flip:
        raise ValueError("a fused-flip model always runs the flip test; turn off fused_flip to run without it")
    shape = variant.input_shape(len(crops))
    dest = (lambda: None) if empty is None else (lambda: empty(shape, variant.input_dtype()))
    if variant.uint8_input:
        x = crops if empty is None else _copied(crops, dest())
    else:
        x = crops_to_input(crops, dest())
    if variant.fused_flip or not flip:
        return [x]
    # uint8 NHWC mirrors along axis 2, float NCHW along axis 3: the same pixels either way
    return [x, flip_crops(crops, dest()) if variant.uint8_input else flip_input(x, dest())]


def _copied(a: np.ndarray, into: np.ndarray) -> np.ndarray:
    np.copyto(into, a)
    return into


@dataclass
class InferredBatch:
    heatmaps: np.ndarray  # float32 [n, 17, 64, 48], flip-merged
    device_seconds: float
    calls: int  # backend calls made
    crops: int  # network inputs computed (2 per box with flip test)
    bytes_to_device: int  # what the backend was handed
    bytes_from_device: int  # the heatmaps it returned


def run_network(backend: Backend, inputs: list[np.ndarray],
                outs: list[np.ndarray] | None = None) -> tuple[list[np.ndarray], float]:
    """The device part: one backend call per input array; their outputs (written into ``outs`` where
    given) and device seconds."""
    outputs, seconds = [], 0.0
    for k, x in enumerate(inputs):
        y, s = backend.run(x, None if outs is None else outs[k])
        outputs.append(y)
        seconds += s
    return outputs, seconds


def output_shape(n: int) -> tuple[int, ...]:
    """What one backend call on ``n`` crops returns: float32 heatmaps."""
    return (n, FASTPOSE.num_joints, *FASTPOSE.heatmap_hw)


def warm_up(backend: Backend, flip: bool = True) -> None:
    """Run one full batch of black crops through the backend, outputs dropped.

    A fresh session's first calls are slower (ONNX Runtime: 0.76 and 0.90 s
    against 0.62 s at bs16 on 2 cores, measured) while it sizes its memory and
    picks kernels; that is session setup, like loading the model, and ais_bench
    warms up the same way before it times. With the flip test one batch is two
    calls, the two slow ones. The bare figure of ``runner bench`` does the same.
    """
    crops = np.zeros((backend.batch_size, *FASTPOSE.input_hw, 3), np.uint8)
    inputs = network_inputs(crops, backend.variant, flip)
    run_network(backend, inputs)


def merge_heatmaps(outputs: list[np.ndarray]) -> np.ndarray:
    """The batch's heatmaps from the backend's outputs: two passes flip-merged, or a fused model's one."""
    return flip_merge(outputs[0], outputs[1]) if len(outputs) == 2 else outputs[0]


def merge_outputs(variant: Variant, inputs: list[np.ndarray], outputs: list[np.ndarray],
                  seconds: float) -> InferredBatch:
    """Flip-merge two passes (docs/numerics.md#flip); a fused model's one output is merged already."""
    heatmaps = merge_heatmaps(outputs)
    n = len(inputs[0])
    crops = 2 * n if variant.fused_flip else n * len(inputs)
    return InferredBatch(heatmaps, seconds, len(outputs), crops, sum(x.nbytes for x in inputs),
                         sum(y.nbytes for y in outputs))


def infer_flip_test(backend: Backend, crops: np.ndarray, flip: bool = True) -> InferredBatch:
    """Run the network on the crops and, with ``flip``, on their mirror; merge (docs/numerics.md#flip).

    The backend's variant decides the split of work: a fused-flip model mirrors and
    merges inside its one call; a uint8-input model normalises the crops itself.
    Either way the heatmaps are the same (tests).
    """
    inputs = network_inputs(crops, backend.variant, flip)
    outputs, seconds = run_network(backend, inputs)
    return merge_outputs(backend.variant, inputs, outputs, seconds)


def keypoints_for_batch(backend: Backend, batch: PreparedBatch, flip: bool = True
                        ) -> tuple[np.ndarray, InferredBatch]:
    """float32 ``[n, 17, 3]`` keypoints (x, y, score in image pixels) and the inference record."""
    inferred = infer_flip_test(backend, batch.crops, flip)
    return decode_keypoints(inferred.heatmaps, batch.crop_boxes), inferred
