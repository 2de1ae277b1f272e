"""What a model file computes beyond the plain network, the concept every stage reads.

- ``fused_flip``: one call runs the batch and its mirror and returns the flip-merged heatmaps.
- ``uint8_input``: the model takes the uint8 crops as cut and normalises them in its graph.

Both give the plain path's keypoints (``tasks.deploy.deployed_module`` builds them; tests).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.spec import FASTPOSE, ModelSpec

F32_BYTES = 4


@dataclass(frozen=True)
class Variant:
    fused_flip: bool = False
    uint8_input: bool = False

    def tag(self) -> str:
        """Part of a cached model's file name; empty for the plain network."""
        return ("-fflip" if self.fused_flip else "") + ("-u8" if self.uint8_input else "")

    def input_shape(self, n: int | str, spec: ModelSpec = FASTPOSE) -> list:
        h, w = spec.input_hw
        return [n, h, w, 3] if self.uint8_input else [n, 3, h, w]

    def input_dtype(self) -> type:
        return np.uint8 if self.uint8_input else np.float32


def bytes_per_box(variant: Variant, flip: bool, spec: ModelSpec = FASTPOSE) -> dict[str, int]:
    """Bytes sent to and returned from the device per box, by the variant and the flip test."""
    h, w = spec.input_hw
    pixels = 3 * h * w
    sent = pixels * (1 if variant.uint8_input else F32_BYTES)
    back = spec.num_joints * spec.heatmap_hw[0] * spec.heatmap_hw[1] * F32_BYTES
    passes = 2 if flip and not variant.fused_flip else 1
    return {"to_device": sent * passes, "from_device": back * passes}
