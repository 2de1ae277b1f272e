"""FastPose with an SE-ResNet-50 backbone (AlphaPose ``fast_res50_256x192``): docs/numerics.md#network.

The layer names match upstream's so that the released checkpoint loads unchanged
and strictly: ``preact.*`` (backbone), ``duc1.*``, ``duc2.*``, ``conv_out.*``.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.errors import UserError
from tasks.spec import FASTPOSE, ModelSpec




class SELayer(nn.Module):
    """Squeeze-and-excitation with reduction 1 (C -> C -> C, biases, sigmoid gate)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels), nn.ReLU(inplace=True),
            nn.Linear(channels, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x.mean(dim=(2, 3)))
        return x * z[:, :, None, None]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, first: bool) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # Stride on the 3x3 conv: torchvision's "v1.5" layout.
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        # SE and the projection shortcut live only in the first block of each stage
        # (trap T14); layer1.0 has both because 64 != 256.
        self.se = SELayer(out) if first else None
        self.downsample = nn.Sequential(
            nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
            nn.BatchNorm2d(out)) if first else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.relu(self.bn1(self.conv1(x)))
        t = self.relu(self.bn2(self.conv2(t)))
        t = self.bn3(self.conv3(t))
        if self.se is not None:
            t = self.se(t)
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu(t + identity)


class SEResNet50(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        stages = []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layer = [Bottleneck(inplanes, planes, stride, first=True)]
            inplanes = planes * Bottleneck.expansion
            layer += [Bottleneck(inplanes, planes, 1, first=False) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class DUC(nn.Module):
    """Conv3x3 -> BN -> ReLU -> PixelShuffle(2) (dense upsampling convolution)."""

    def __init__(self, inplanes: int, planes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.pixel_shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pixel_shuffle(self.relu(self.bn(self.conv(x))))


class FastPose(nn.Module):
    """``[N,3,256,192]`` float32 RGB input -> raw ``[N,17,64,48]`` heatmaps (no sigmoid)."""

    def __init__(self, spec: ModelSpec = FASTPOSE) -> None:
        super().__init__()
        self.preact = SEResNet50()
        self.suffle1 = nn.PixelShuffle(2)  # sic: upstream's name; it has no parameters
        self.duc1 = DUC(512, 1024)
        self.duc2 = DUC(256, 512)
        self.conv_out = nn.Conv2d(128, spec.num_joints, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.suffle1(self.preact(x))
        return self.conv_out(self.duc2(self.duc1(x)))


class CheckpointError(UserError, ValueError):
    """The checkpoint file is not a FastPose-R50 state_dict; the message is one line."""


def checkpoint_filter_fn(state: object, path: str) -> dict[str, torch.Tensor]:
    """Unwrap ``{'state_dict': ...}`` / ``{'model': ...}`` and strip a ``module.`` prefix."""
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "model"):
        state = next(iter(state.values()))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state_dict (name -> tensor); "
                              "expected AlphaPose's fast_res50_256x192.pth")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _key_diff(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {list(state[k].shape)}!={list(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {label}: {shown}")
    if problems:
        raise CheckpointError(f"{path}: not a FastPose-R50 checkpoint: " + "; ".join(problems)
                              + "; give AlphaPose's fast_res50_256x192.pth (FastPose ResNet-50 256x192)")


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint without unpickling code (``weights_only=True``)."""
    path = str(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except pickle.UnpicklingError:  # weights_only refused objects other than tensors (code among them)
        raise CheckpointError(f"{path}: refused: the file holds Python objects other than "
                              "tensors, and loading it could run code (weights_only=True)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint "
                              f"(truncated or not a torch file): {str(e).splitlines()[0]}; download it again "
                              "(fast_res50_256x192.pth is 162,603,012 bytes)") from None
    return checkpoint_filter_fn(state, path)


def _not_a_torch_file(path: str) -> str | None:
    """Why ``path`` is not a file ``torch.save`` wrote, or None if it may be one (or cannot be read).

    ``torch.save`` writes a zip archive (``PK\\x03\\x04``) since torch 1.6 and a pickle
    stream (``\\x80``, protocol 2) before. Anything else fails in the unpickler, whose
    message ("could run code") would point the user the wrong way.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(20)
            size = f.seek(0, 2)
    except OSError:
        return None  # load_checkpoint names the problem (no such file, unreadable)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if len(head) >= 16:
        from tasks.detector.darknet_weights import DarknetHeader  # here: tasks.detector imports this module

        major, minor, revision = (int(v) for v in np.frombuffer(head, "<i4", count=3))
        header = DarknetHeader(major, minor, revision, 0)
        # Darknet's own header rule (major, minor < 1000), then a whole number of float32s after it.
        if 0 <= major < 1000 and 0 <= minor < 1000 and 0 <= revision < 1000 and size > header.nbytes \
                and (size - header.nbytes) % 4 == 0:
            return (f"not a torch checkpoint: it looks like Darknet weights (header version "
                    f"{major}.{minor}.{revision}, {(size - header.nbytes) // 4:,} float32 values): give it to "
                    f"--detector-weights, and AlphaPose's fast_res50_256x192.pth to --weights")
    return ("not a torch checkpoint (neither the zip archive nor the pickle that torch.save writes); "
            "give AlphaPose's fast_res50_256x192.pth (FastPose ResNet-50 256x192)")


def check_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError (one line) unless ``path`` loads strictly into FastPose.

    The driver calls it before any worker starts, so a wrong, truncated or unsafe
    file is reported by name at once instead of as a failed worker.
    """
    reason = _not_a_torch_file(str(path))
    if reason:
        raise CheckpointError(f"{path}: {reason}")
    state = load_checkpoint(path)
    with torch.device("meta"):  # shapes only: no memory, no init
        model = FastPose()
    _key_diff(model, state, str(path))


def build_fastpose(weights: str | Path | dict[str, torch.Tensor] | None = None,
                   seed: int | None = None) -> FastPose:
    """A FastPose in eval mode, from a checkpoint file, a state_dict, or seeded random init."""
    if seed is not None:
        torch.manual_seed(seed)
    model = FastPose()
    if weights is not None:
        path = "<state_dict>" if isinstance(weights, dict) else str(weights)
        state = checkpoint_filter_fn(weights, path) if isinstance(weights, dict) else load_checkpoint(weights)
        _key_diff(model, state, path)
        model.load_state_dict(state, strict=True)
    elif seed is not None:
        randomize_batchnorm(model, seed)
    return model.eval()


def randomize_batchnorm(model: nn.Module, seed: int) -> None:
    """Give BN layers non-trivial running stats so a random network is not degenerate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1.0 + 0.1 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(1.0 + 0.1 * torch.rand(n, generator=g))
