"""ONNX Runtime backend: an exported FastPose on the CPU provider, or CUDA when asked."""
from __future__ import annotations

import time

import numpy as np

from tasks.backends.base import BackendUnavailable
from tasks.deploy import Variant


class OnnxRuntimeBackend:
    def __init__(self, model_path: str, device: str, batch_size: int, threads: int,
                 variant: Variant = Variant()) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable(f"onnxruntime backend: {e}; pip install onnxruntime") from None
        opts = ort.SessionOptions()
        # ONNX Runtime ignores OMP_NUM_THREADS: without this it takes every core of
        # the host and oversubscribes when several workers share it.
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("onnxruntime backend: no CUDA provider in this onnxruntime "
                                         "(pip install onnxruntime-gpu, or use --devices cpu)")
            index = int(device.split(":")[1]) if ":" in device else 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(model_path, opts, providers=providers)
        inp = self.session.get_inputs()[0]
        check_input(model_path, inp.type, inp.shape, variant)
        self.input_name = inp.name
        self.batch_size = batch_size
        self.variant = variant

    def run(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        (y,) = self.session.run(None, {self.input_name: x})
        return y, time.perf_counter() - t0

    def close(self) -> None:
        self.session = None


def check_input(model_path: str, onnx_type: str, shape: list, variant: Variant) -> None:
    """Refuse an ONNX whose input is not what ``variant`` sends (a file of another variant)."""
    want = "tensor(uint8)" if variant.uint8_input else "tensor(float)"
    if onnx_type != want or [d for d in shape[1:]] != variant.input_shape("N")[1:]:
        raise BackendUnavailable(f"{model_path} takes {onnx_type} {shape}, but the run sends "
                                 f"{want} {variant.input_shape('N')}: export it with this variant "
                                 "(tasks.export.ExportOptions.variant) or change --uint8-input")
