"""OpenVINO backend: the exported FastPose ONNX on Intel CPUs, in float32.

OpenVINO's CPU plugin picks bf16 by default on CPUs that have it; that was slower
and less accurate here, so the precision is forced to f32. Optional: ``pip install
openvino`` (not in requirements.txt).
"""
from __future__ import annotations

import time

import numpy as np

from tasks.backends.base import BackendUnavailable, deliver
from tasks.backends.onnxrt import check_input
from tasks.variant import Variant


class OpenVinoBackend:
    def __init__(self, model_path: str, device: str, batch_size: int, threads: int,
                 variant: Variant = Variant()) -> None:
        try:
            import openvino as ov
        except ImportError as e:
            raise BackendUnavailable(f"openvino backend: {e}; pip install openvino") from None
        if device != "cpu":
            raise BackendUnavailable(f"openvino backend runs on the CPU here, got device {device!r}: "
                                     "use --devices cpu or cpu:N")
        core = ov.Core()
        model = core.read_model(model_path)
        inp = model.inputs[0]
        onnx_type = {"u8": "tensor(uint8)", "f32": "tensor(float)"}.get(inp.get_element_type().get_type_name(),
                                                                        str(inp.get_element_type()))
        shape = [d.get_length() if d.is_static else "N" for d in inp.get_partial_shape()]
        check_input(model_path, onnx_type, shape, variant)
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": max(1, threads),
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
        self.request = self.compiled.create_infer_request()
        self.batch_size = batch_size
        self.variant = variant

    def run(self, x: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        self.request.infer({0: x})
        seconds = time.perf_counter() - t0
        data = self.request.get_output_tensor(0).data
        return deliver(data.copy() if out is None else data, out), seconds  # the request reuses its buffer

    def close(self) -> None:
        self.request = self.compiled = None
