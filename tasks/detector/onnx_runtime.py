"""The detector network as ONNX, run with ONNX Runtime on the CPU.

The graph carries only the network (input -> raw head maps); decode and post-processing
stay in ``yolo.decode_yolo_heads`` / ``postprocess`` so every backend shares them.
Expect ~0.02 px / 3e-5 score differences from PyTorch, not bit equality (docs/numerics.md#detector-reproducibility, trap D20).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from tasks.backends.sessions import onnxruntime_session

from .yolo import Darknet, NetFn

INPUT_NAME = "input"


def export_darknet_onnx(model: Darknet, path: str | Path, inp: int = 608, opset: int = 17,
                        batch_size: int | None = None) -> Path:
    """Write ``model`` as ONNX and check the graph; returns ``path``.

    ``batch_size=None``: a dynamic batch; an int fixes it (ATC wants a static shape,
    and the detector runs one image at a time: batch 1). The export options are stored
    in the model's metadata so the file describes itself.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs = [f"yolo_raw_{k}" for k in range(len(model.cfg.yolo_heads))]
    dummy = torch.zeros(batch_size or 1, 3, inp, inp)
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (dynamo=False); the zero pad's
        # index arithmetic is left unfolded, which onnxruntime runs as is.
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
        torch.onnx.export(model.eval(), (dummy,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=outputs,
                          dynamic_axes=None if batch_size else {name: {0: "batch"} for name in [INPUT_NAME, *outputs]})
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    for key, value in (("runner.input", f"float32[{batch_size or 'batch'},3,{inp},{inp}] RGB /255 letterbox"),
                       ("runner.outputs", "raw [yolo] inputs in cfg order"),
                       ("runner.opset", str(opset))):
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    return path


def onnxruntime_net_fn(onnx_path: str | Path, intra_op_threads: int = 2, device: str = "cpu") -> NetFn:
    """An ONNX Runtime session over the exported detector, as a ``NetFn``, on ``device`` as the
    pose stage's ONNX Runtime backend opens it (``tasks.backends.sessions``)."""
    session = onnxruntime_session(onnx_path, device, intra_op_threads)

    def run(x: np.ndarray) -> list[np.ndarray]:
        return session.run(None, {INPUT_NAME: x})

    return run
