"""PyTorch backend: the checkpoint run eagerly on CPU or one CUDA device."""
from __future__ import annotations

import time

import numpy as np

from tasks.backends.base import BackendUnavailable, deliver
from tasks.deploy import deployed_module
from tasks.variant import Variant


class TorchBackend:
    """``variant.fused_flip`` runs the batch and its mirror as one batch of 2n: on CPU,
    PyTorch's sums then differ from two calls of n by up to ~5e-8 (scores; measured),
    as any other batch size would."""

    def __init__(self, model_path: str, device: str, batch_size: int, threads: int,
                 variant: Variant = Variant()) -> None:
        import torch

        from tasks.model import build_fastpose

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(f"torch backend: {device} asked for, but this torch has no CUDA "
                                     "(install a CUDA build of torch, or use --devices cpu)")
        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self._torch = torch
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.variant = variant
        self.model = deployed_module(build_fastpose(model_path), variant).to(self.device)

    def run(self, x: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        torch = self._torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            y = self.model(torch.from_numpy(x).to(self.device))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
            return deliver(y.cpu().numpy(), out), seconds

    def close(self) -> None:
        self.model = None
