"""The Darknet network built from a parsed cfg, and the YOLO head decode
(docs/numerics.md#detector-network, docs/numerics.md#detector-decode).

``Darknet.forward`` returns the raw input of each ``[yolo]`` layer (``[B, A*(5+C), G, G]``),
which is all an exported graph needs to carry; ``decode_yolo_heads`` turns those maps
into candidate rows on the CPU, with the same torch ops upstream uses, so every backend
shares one decode.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .darknet_cfg import (Convolutional, DarknetCfg, MaxPool, Route, Shortcut, Upsample, Yolo,
                          parse_darknet_cfg, source_index)
from .darknet_weights import load_darknet_weights

#: Maps a letterboxed float32 ``[B, 3, INP, INP]`` array to the raw head maps.
NetFn = Callable[[np.ndarray], Sequence[np.ndarray | torch.Tensor]]


class ZeroPadMaxPool(nn.Module):
    """SPP max pool: zero padding, then an unpadded stride-1 max (trap D1).

    ``MaxPool2d(padding=...)`` pads with -inf, which changes the border of a map
    that has negative values.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = (self.size - 1) // 2
        return F.max_pool2d(F.pad(x, (p, p, p, p)), self.size, 1)


def _conv(in_channels: int, block: Convolutional) -> nn.Sequential:
    # Conv, then eval BatchNorm (eps 1e-5), then LeakyReLU(0.1), as separate ops: folding
    # BN into the conv changes the last bits (docs/numerics.md#detector-reproducibility).
    layers: list[nn.Module] = [nn.Conv2d(
        in_channels, block.filters, block.size, block.stride,
        (block.size - 1) // 2 if block.pad else 0, bias=not block.batch_normalize)]
    if block.batch_normalize:
        layers.append(nn.BatchNorm2d(block.filters))
    if block.activation == "leaky":
        layers.append(nn.LeakyReLU(0.1))
    elif block.activation != "linear":
        raise ValueError(f"unsupported activation {block.activation!r}")
    return nn.Sequential(*layers)


class Darknet(nn.Module):
    """``[B, 3, H, W]`` float32 RGB in [0, 1] -> one raw map per ``[yolo]`` layer."""

    def __init__(self, cfg: DarknetCfg, in_channels: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList()
        channels: list[int] = []
        c = in_channels
        for i, block in enumerate(cfg.layers):
            module: nn.Module = nn.Identity()
            if isinstance(block, Convolutional):
                module = _conv(c, block)
                c = block.filters
            elif isinstance(block, Route):
                c = sum(channels[source_index(i, j)] for j in block.layers)
            elif isinstance(block, MaxPool):
                module = (ZeroPadMaxPool(block.size) if block.stride == 1
                          else nn.MaxPool2d(block.size, block.stride))
            elif isinstance(block, Upsample):
                module = nn.Upsample(scale_factor=block.stride, mode="nearest")
            elif isinstance(block, Shortcut) and channels[source_index(i, block.from_)] != c:
                raise ValueError(f"layer {i}: shortcut adds {channels[source_index(i, block.from_)]} "
                                 f"channels to {c}")
            self.layers.append(module)
            channels.append(c)
        # Only outputs that a later route or shortcut reads are kept during forward.
        self._kept = frozenset(
            source_index(i, j) for i, b in enumerate(cfg.layers)
            for j in (b.layers if isinstance(b, Route) else (b.from_,) if isinstance(b, Shortcut) else ()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kept: dict[int, torch.Tensor] = {}
        heads = []
        for i, (block, module) in enumerate(zip(self.cfg.layers, self.layers)):
            if isinstance(block, Route):
                maps = [kept[source_index(i, j)] for j in block.layers]
                x = maps[0] if len(maps) == 1 else torch.cat(maps, 1)
            elif isinstance(block, Shortcut):
                x = x + kept[source_index(i, block.from_)]
            elif isinstance(block, Yolo):
                heads.append(x)  # passes x on unchanged: a later route -4 means the conv (D21)
            else:
                x = module(x)
            if i in self._kept:
                kept[i] = x
        return tuple(heads)

    def tensors_in_file_order(self) -> list[torch.Tensor]:
        """Parameters and BN buffers in Darknet's ``.weights`` order (trap D11)."""
        out: list[torch.Tensor] = []
        for block, module in zip(self.cfg.layers, self.layers):
            if isinstance(block, Convolutional):
                conv = module[0]
                if block.batch_normalize:
                    bn = module[1]
                    out += [bn.bias, bn.weight, bn.running_mean, bn.running_var]
                else:
                    out.append(conv.bias)
                out.append(conv.weight)
        return out


def build_darknet(cfg: DarknetCfg | str | Path, weights_path: str | Path | None = None) -> Darknet:
    """The network from a ``.cfg`` (path or parsed) and optionally a ``.weights`` file, in eval mode."""
    model = Darknet(cfg if isinstance(cfg, DarknetCfg) else parse_darknet_cfg(cfg))
    if weights_path is not None:
        load_darknet_weights(model.tensors_in_file_order(), weights_path)
    return model.eval()


def torch_net_fn(model: Darknet, device: str = "cpu") -> NetFn:
    """Run ``model`` on the tensors torch makes from the input array.

    On another ``device`` (``cuda:0``) the model moves there and the maps come back to
    the CPU, where the shared decode runs.
    """
    if device == "cpu":
        def run(x: np.ndarray) -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                return model(torch.from_numpy(x))

        return run
    model = model.to(device)

    def run_on_device(x: np.ndarray) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(m.cpu() for m in model(torch.from_numpy(x).to(device)))

    return run_on_device


def decode_yolo_head(raw: torch.Tensor, head: Yolo, inp: int) -> torch.Tensor:
    """``[B, A*(5+C), G, G]`` -> ``[B, G*G*A, 5+C]`` rows ``(xc, yc, w, h, obj, p_0..)``.

    Rows are cells in row-major order with the anchor fastest; channel ``a*(5+C) + k``
    is attribute ``k`` of anchor ``a`` (D19). Boxes are in letterbox pixels.
    """
    b, g, a, attrs = raw.shape[0], raw.shape[2], len(head.anchors), 5 + head.classes
    stride = inp // g
    grid = inp // stride
    p = raw.reshape(b, attrs * a, grid * grid).transpose(1, 2).contiguous().view(b, grid * grid * a, attrs)
    # Sigmoid on the strided column views, not a contiguous copy: torch's CPU kernel
    # takes another path there, and upstream's last bits come from this one
    # (docs/numerics.md#detector-reproducibility).
    p[:, :, 0] = torch.sigmoid(p[:, :, 0])
    p[:, :, 1] = torch.sigmoid(p[:, :, 1])
    p[:, :, 4] = torch.sigmoid(p[:, :, 4])
    cell = torch.arange(grid * grid)
    offsets = torch.stack((cell % grid, cell // grid), 1).to(torch.float32).repeat_interleave(a, 0)
    p[:, :, :2] += offsets
    anchors = torch.tensor([(w / stride, h / stride) for w, h in head.anchors], dtype=torch.float32)
    p[:, :, 2:4] = torch.exp(p[:, :, 2:4]) * anchors.repeat(grid * grid, 1)
    p[:, :, 5:] = torch.sigmoid(p[:, :, 5:])  # independent sigmoids, not a softmax
    p[:, :, :4] *= stride
    return p


def decode_yolo_heads(raw_maps: Sequence[np.ndarray | torch.Tensor], heads: Sequence[Yolo],
                      inp: int) -> torch.Tensor:
    """All heads decoded and stacked on rows, in cfg order: float32 ``[B, N, 5+C]``."""
    if len(raw_maps) != len(heads):
        raise ValueError(f"{len(raw_maps)} raw maps for {len(heads)} yolo heads")
    return torch.cat([decode_yolo_head(torch.as_tensor(r), h, inp) for r, h in zip(raw_maps, heads)], 1)
