"""Inference backends behind one interface (``base.Backend``), chosen from one explicit table.

Each backend is imported only when it is opened, so a host without a runtime
(ais_bench, CUDA, ...) can still use the others.
"""
from __future__ import annotations

import importlib

from tasks.backends.base import Backend, BackendUnavailable
from tasks.deploy import Variant

#: backend name -> (module, class, the model file it opens)
BACKENDS = {
    "torch": ("tasks.backends.pytorch", "TorchBackend", "checkpoint"),
    "onnxruntime": ("tasks.backends.onnxrt", "OnnxRuntimeBackend", "onnx"),
    "openvino": ("tasks.backends.openvino", "OpenVinoBackend", "onnx"),
    "om": ("tasks.backends.om", "OmBackend", "om"),
    "sim": ("tasks.backends.sim", "SimBackend", None),
}


def open_backend(name: str, model_path: str | None, device: str, batch_size: int, threads: int,
                 variant: Variant = Variant(), sim_rate: float = 0.0) -> Backend:
    """Open backend ``name`` on ``device`` ('cpu', 'cuda:N', 'npu:N': the id this process sees).

    ``model_path`` must implement ``variant`` (an ONNX or OM exported with it; torch
    wraps the checkpoint itself). ``sim_rate``: network inputs per second of the
    simulated device, for ``sim`` only.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls, _ = BACKENDS[name]
    opened = getattr(importlib.import_module(module), cls)
    if name == "sim":
        return opened(sim_rate, batch_size, variant)
    return opened(model_path, device, batch_size, threads, variant)


__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "open_backend"]
