"""The network as deployed: FastPose, optionally with the flip test and the normalisation in its graph.

``deployed_module`` wraps the network to implement a ``tasks.variant.Variant``, each
keypoint-identical to the plain path (tests):

- ``fused_flip``: one call takes the batch, runs it and its mirror as one batch
  of 2n and returns the flip-merged heatmaps (docs/numerics.md#flip, clean shift). Half
  the calls and half the bytes back; the same compute as a plain call at 2n.
- ``uint8_input``: the input is the uint8 RGB crop as cut, ``[n, 256, 192, 3]``;
  the graph normalises it exactly as docs/numerics.md#input (float32 divide, then subtract,
  and trap T9's no-divide for a crop whose max is <= 1). 4x fewer bytes to the
  device and no normalisation on the host (on Ascend this is AIPP's job).
"""
from __future__ import annotations

from tasks.spec import FASTPOSE, ModelSpec
from tasks.variant import Variant

def deployed_module(model, variant: Variant, spec: ModelSpec = FASTPOSE):
    """``model`` (a FastPose ``nn.Module``) wrapped to implement ``variant``; the plain model if neither."""
    if not (variant.fused_flip or variant.uint8_input):
        return model
    import torch

    class Deployed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.register_buffer("mean", torch.tensor(spec.mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("order", torch.tensor(spec.flip_order(), dtype=torch.int64))

        def normalise(self, crops: torch.Tensor) -> torch.Tensor:
            x = crops.permute(0, 3, 1, 2).to(torch.float32)
            peak = torch.amax(x, dim=(1, 2, 3), keepdim=True)
            # fl32(fl32(p / 255) - mean): the same two roundings as the host's table.
            # contiguous: a channels-last tensor would take other conv kernels, other sums.
            return (torch.where(peak > 1, x / 255.0, x) - self.mean).contiguous()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if variant.uint8_input:
                x = self.normalise(x)
            if not variant.fused_flip:
                return self.net(x)
            n = x.shape[0]
            both = self.net(torch.cat([x, torch.flip(x, dims=[3])]))
            plain, mirrored = both[:n], both[n:]
            f = torch.index_select(torch.flip(mirrored, dims=[3]), 1, self.order)
            back = torch.cat([f[..., :1], f[..., :-1]], dim=3)  # the clean shift (trap T1)
            return (plain + back) / 2.0

    return Deployed().eval()
