"""Darknet ``.weights`` files: a small header, then every conv layer's floats
(docs/numerics.md#detector-network; trap D11).

Header: int32 major, minor, revision, then ``seen``, which is 8 bytes from version 0.2
on and 4 bytes before (Darknet's rule). Upstream always skips 20 bytes; for 0.2+ files,
``yolov3-spp.weights`` included, that is the same thing.

Body: little-endian float32, conv layers in cfg order. A conv with BN takes
``beta, gamma, running_mean, running_var, weight``; one without takes ``bias, weight``.
The caller hands over the tensors in that file order (``Darknet.tensors_in_file_order``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.errors import UserError


class WeightsError(UserError, ValueError):
    """The weights file does not fit the network; the message is one line."""


@dataclass(frozen=True)
class DarknetHeader:
    major: int
    minor: int
    revision: int
    seen: int

    @property
    def seen_is_64bit(self) -> bool:
        return self.major * 10 + self.minor >= 2 and self.major < 1000 and self.minor < 1000

    @property
    def nbytes(self) -> int:
        return 20 if self.seen_is_64bit else 16


def read_darknet_weights(path: str | Path) -> tuple[DarknetHeader, np.ndarray, int]:
    """The header, the float32 body and the file size in bytes of a ``.weights`` file.

    A trailing partial float is left out of the body; the size still counts it.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(20)
            size = f.seek(0, 2)
            if len(head) < 16:
                raise WeightsError(f"{path}: {size} bytes, too short for a Darknet weights header")
            major, minor, revision = (int(v) for v in np.frombuffer(head, "<i4", count=3))
            wide = DarknetHeader(major, minor, revision, 0).seen_is_64bit
            if wide and len(head) < 20:
                raise WeightsError(f"{path}: {size} bytes, too short for a version "
                                   f"{major}.{minor}.{revision} header (20 bytes)")
            seen = int(np.frombuffer(head, "<u8" if wide else "<u4", count=1, offset=12)[0])
            header = DarknetHeader(major, minor, revision, seen)
            f.seek(header.nbytes)
            body = np.fromfile(f, "<f4", count=(size - header.nbytes) // 4).astype(np.float32, copy=False)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read the weights ({e.strerror})") from None
    return header, body, size


def load_darknet_weights(tensors: Sequence[torch.Tensor], path: str | Path) -> DarknetHeader:
    """Fill ``tensors`` (in file order) from ``path``; the body must fit exactly.

    Upstream ignores extra floats and fails late on missing ones; here any mismatch is
    one line naming the file and both counts.
    """
    header, body, size = read_darknet_weights(path)
    expected = sum(t.numel() for t in tensors)
    if size != header.nbytes + 4 * expected:
        stray = (size - header.nbytes) % 4
        raise WeightsError(
            f"{path}: holds {body.size:,} float32 values{f' and {stray} stray bytes' if stray else ''} "
            f"after its {header.nbytes}-byte header (version {header.major}.{header.minor}."
            f"{header.revision}), but the cfg needs {expected:,}: expected "
            f"{header.nbytes + 4 * expected:,} bytes, got {size:,}")
    ptr = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(torch.from_numpy(body[ptr:ptr + n]).view_as(t))
            ptr += n
    return header

