"""Inference backends behind one interface (``base.Backend``), chosen from one explicit table.

Each backend is imported only when it is opened, so a host without a runtime
(ais_bench, CUDA, ...) can still use the others.
"""
from __future__ import annotations

import importlib

from tasks.backends.base import Backend, BackendUnavailable

#: backend name -> (module, class, the model file it opens)
BACKENDS = {
    "torch": ("tasks.backends.pytorch", "TorchBackend", "checkpoint"),
    "onnxruntime": ("tasks.backends.onnxrt", "OnnxRuntimeBackend", "onnx"),
    "om": ("tasks.backends.om", "OmBackend", "om"),
}


def open_backend(name: str, model_path: str, device: str, batch_size: int, threads: int) -> Backend:
    """Open backend ``name`` on ``device`` ('cpu', 'cuda:N', 'npu:N': the id this process sees)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls, _ = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(model_path, device, batch_size, threads)


__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "open_backend"]
