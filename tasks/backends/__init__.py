"""Inference backends behind one interface (``base.Backend``), chosen from one explicit table.

``BACKENDS`` names, per backend, the class that runs FastPose and the function that
opens the detector's network (None where the detector has no such backend). Each is
imported only when it is opened, so a host without a runtime (ais_bench, CUDA, ...)
can still use the others. How each runtime's session is set up is ``sessions.py``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from tasks.backends.base import Backend, BackendUnavailable
from tasks.variant import Variant


@dataclass(frozen=True)
class Runtime:
    pose: str  # 'module:Class', a base.Backend
    detector: str | None  # 'module:function' -> tasks.detector.runtime.Detector; None: none for the detector


BACKENDS = {
    "torch": Runtime("tasks.backends.pytorch:TorchBackend", "tasks.detector.runtime:open_torch_detector"),
    "onnxruntime": Runtime("tasks.backends.onnxrt:OnnxRuntimeBackend", "tasks.detector.runtime:open_onnx_detector"),
    "openvino": Runtime("tasks.backends.openvino:OpenVinoBackend", None),
    "om": Runtime("tasks.backends.om:OmBackend", "tasks.detector.om_runtime:open_om_detector"),
    "sim": Runtime("tasks.backends.sim:SimBackend", None),
}
#: The backends the detector runs on.
DETECTOR_BACKENDS = tuple(name for name, r in BACKENDS.items() if r.detector)


def load(target: str):
    """``'module:attr'`` -> the attribute, importing its module now."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def open_backend(name: str, model_path: str | None, device: str, batch_size: int, threads: int,
                 variant: Variant = Variant(), sim_rate: float = 0.0, sim_gil: str = "hold") -> Backend:
    """Open backend ``name`` on ``device`` ('cpu', 'cuda:N', 'npu:N': the id this process sees).

    ``model_path`` must implement ``variant`` (an ONNX or OM exported with it; torch
    wraps the checkpoint itself). ``sim_rate``: network inputs per second of the
    simulated device, for ``sim`` only; ``sim_gil``: whether its call keeps Python's GIL
    ('hold', as aclruntime does) or releases it ('release', as ONNX Runtime and torch do).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    opened = load(BACKENDS[name].pose)
    if name == "sim":
        return opened(sim_rate, batch_size, variant, sim_gil)
    return opened(model_path, device, batch_size, threads, variant)


__all__ = ["BACKENDS", "DETECTOR_BACKENDS", "Backend", "BackendUnavailable", "Runtime", "load", "open_backend"]
