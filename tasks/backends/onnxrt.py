"""ONNX Runtime backend: an exported FastPose on the CPU provider, or CUDA when asked."""
from __future__ import annotations

import time

import numpy as np

from tasks.backends.base import BackendUnavailable, deliver
from tasks.backends.sessions import onnxruntime_session
from tasks.variant import Variant


class OnnxRuntimeBackend:
    def __init__(self, model_path: str, device: str, batch_size: int, threads: int,
                 variant: Variant = Variant()) -> None:
        self.session = onnxruntime_session(model_path, device, threads)
        inp = self.session.get_inputs()[0]
        check_input(model_path, inp.type, inp.shape, variant)
        self.input_name = inp.name
        self.batch_size = batch_size
        self.variant = variant

    def run(self, x: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        (y,) = self.session.run(None, {self.input_name: x})
        seconds = time.perf_counter() - t0
        return deliver(y, out), seconds

    def close(self) -> None:
        self.session = None


def check_input(model_path: str, onnx_type: str, shape: list, variant: Variant) -> None:
    """Refuse an ONNX whose input is not what ``variant`` sends (a file of another variant)."""
    want = "tensor(uint8)" if variant.uint8_input else "tensor(float)"
    if onnx_type != want or [d for d in shape[1:]] != variant.input_shape("N")[1:]:
        raise BackendUnavailable(f"{model_path} takes {onnx_type} {shape}, but the run sends "
                                 f"{want} {variant.input_shape('N')}: export it with this variant "
                                 "(tasks.export.ExportOptions.variant) or change --uint8-input")
