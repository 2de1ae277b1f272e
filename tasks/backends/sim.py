"""A simulated device of a given speed: the framework measured without hardware.

``SimBackend(rate)`` takes as long per call as a device computing ``rate`` network
inputs per second would (a fused flip call of n boxes computes 2n inputs), waiting
without using a host core, as a real device does. Its heatmaps are zeros, so the
host still decodes them; accuracy means nothing. It answers "how many host cores
do N cards of this speed need?" (``python -m runner bench``).

``gil`` says what the wait does to the calling process's other threads. ``hold``
(the default) keeps Python's GIL for the whole call, as aclruntime's ``infer`` does
on a real NPU (its binding never releases it; docs/throughput.md#the-gil), so a
sim device stands for an NPU with the same cost to the worker's process.
``release`` lets them run, as ONNX Runtime, PyTorch and OpenVINO calls do.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import time

import numpy as np

from tasks.spec import FASTPOSE
from tasks.variant import Variant

GIL_MODES = ("hold", "release")


def sleep_holding_gil(seconds: float) -> None:
    """Sleep without letting another thread of this process run Python: a C call made with the GIL held.

    ``ctypes.PyDLL`` calls keep the GIL (``ctypes.CDLL`` ones release it), as a
    pybind function without ``gil_scoped_release`` does.
    """
    while seconds > 0:
        step = min(seconds, 0.5)  # usleep may refuse a second or more
        _LIBC.usleep(ctypes.c_uint(int(step * 1e6)))
        seconds -= step


_LIBC = ctypes.PyDLL(ctypes.util.find_library("c"))


class SimBackend:
    def __init__(self, rate: float, batch_size: int, variant: Variant = Variant(), gil: str = "hold") -> None:
        if not rate > 0:
            raise ValueError(f"sim backend: --sim-rate {rate!r} must be a positive number of crops per second")
        if gil not in GIL_MODES:
            raise ValueError(f"sim backend: --sim-gil {gil!r}: use one of {', '.join(GIL_MODES)}")
        self.rate = float(rate)
        self.batch_size = batch_size
        self.variant = variant
        self.gil = gil

    def run(self, x: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        n = len(x)
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"SimBackend.run got {n} crops; it takes 1..{self.batch_size}")
        seconds = n * (2 if self.variant.fused_flip else 1) / self.rate
        # within the call's time, as a device's copy to the host lies within its latency
        if out is None:
            heatmaps = np.zeros((n, FASTPOSE.num_joints, *FASTPOSE.heatmap_hw), np.float32)
        else:
            heatmaps = out
            heatmaps.fill(0.0)
        wait = sleep_holding_gil if self.gil == "hold" else time.sleep
        # Sleep to a deadline: the call lasts its compute time whatever the host spent in it.
        while (left := start + seconds - time.perf_counter()) > 0:
            wait(left)
        return heatmaps, seconds

    def close(self) -> None:
        pass
