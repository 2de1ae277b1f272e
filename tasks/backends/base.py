"""The one interface every inference backend implements.

A backend owns one inference session on one device. It takes a batch of network
inputs and returns the raw heatmaps plus the seconds the device spent computing
them (compute only: no host preprocessing, and no host<->device copies where the
runtime can tell them apart).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from tasks.errors import UserError
from tasks.variant import Variant


class Backend(Protocol):
    #: The largest batch one ``run`` call accepts. Static models (OM) also pad to it.
    batch_size: int
    #: What the model computes: with ``fused_flip`` one call returns flip-merged
    #: heatmaps; with ``uint8_input`` it takes the uint8 crops (tasks.deploy).
    variant: Variant

    def run(self, x: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """``x``: float32 ``[n, 3, 256, 192]`` (uint8 ``[n, 256, 192, 3]`` with
        ``variant.uint8_input``) with ``n <= batch_size``.

        Returns float32 heatmaps ``[n, 17, 64, 48]`` (padding rows already dropped;
        flip-merged with ``variant.fused_flip``) and the device seconds spent on them.
        With ``out`` (float32 ``[n, 17, 64, 48]``, e.g. in a shared slot) the heatmaps
        are written there, by the copy that brings them to the host, and ``out`` is returned.
        """
        ...

    def close(self) -> None:
        """Release the session. The backend is unusable afterwards."""
        ...


class BackendUnavailable(UserError, RuntimeError):
    """The backend's runtime is not installed or cannot open the device.

    The message is one line that says what to install or set up.
    """


def deliver(heatmaps: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``heatmaps`` as float32, written into ``out`` where given (the caller's memory)."""
    if out is None:
        return np.asarray(heatmaps, dtype=np.float32)
    np.copyto(out, heatmaps)
    return out
