"""What travels with the FastPose network, without torch: its input and output shapes, its
normalisation and joint flips.

Workers whose backend is not PyTorch (ONNX Runtime, OM, sim) import this, not ``tasks.model``,
so they never load torch.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """The constants that travel with the network: what it eats and what it returns."""

    input_hw: tuple[int, int] = (256, 192)
    heatmap_hw: tuple[int, int] = (64, 48)
    num_joints: int = 17
    #: Subtracted from R, G, B after /255; no std division (docs/numerics.md#input, trap T5).
    mean_rgb: tuple[float, float, float] = (0.406, 0.457, 0.480)
    #: Left/right joint pairs swapped when the crop is mirrored (COCO order, 0-based).
    flip_pairs: tuple[tuple[int, int], ...] = (
        (1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))

    def flip_order(self) -> list[int]:
        """Joint j of a mirrored crop's heatmaps is joint ``flip_order()[j]`` of the original."""
        order = list(range(self.num_joints))
        for a, b in self.flip_pairs:
            order[a], order[b] = b, a
        return order


FASTPOSE = ModelSpec()
