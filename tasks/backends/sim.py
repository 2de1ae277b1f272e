"""A simulated device of a given speed: the framework measured without hardware.

``SimBackend(rate)`` takes as long per call as a device computing ``rate`` network
inputs per second would (a fused flip call of n boxes computes 2n inputs), waiting
without using a host core, as a real device does. Its heatmaps are zeros, so the
host still decodes them; accuracy means nothing. It answers "how many host cores
do N cards of this speed need?" (``python -m runner bench``).
"""
from __future__ import annotations

import time

import numpy as np

from tasks.spec import FASTPOSE
from tasks.variant import Variant


class SimBackend:
    def __init__(self, rate: float, batch_size: int, variant: Variant = Variant()) -> None:
        if not rate > 0:
            raise ValueError(f"sim backend: --sim-rate {rate!r} must be a positive number of crops per second")
        self.rate = float(rate)
        self.batch_size = batch_size
        self.variant = variant

    def run(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        n = len(x)
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"SimBackend.run got {n} crops; it takes 1..{self.batch_size}")
        seconds = n * (2 if self.variant.fused_flip else 1) / self.rate
        heatmaps = np.zeros((n, FASTPOSE.num_joints, *FASTPOSE.heatmap_hw), np.float32)
        # Sleep to a deadline: the call lasts its compute time whatever the host spent in it.
        while (left := start + seconds - time.perf_counter()) > 0:
            time.sleep(left)
        return heatmaps, seconds

    def close(self) -> None:
        pass
