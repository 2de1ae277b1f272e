"""The detector as a backend opens it: model files made once (driver side), sessions per device (worker side).

    prepare_detector_model(backend, model, weights, cfg, models_dir, soc)  -> the file a worker opens
    open_detector(backend, model_path, cfg_path, device, threads)          -> a Detector (net_fn + heads)

``torch`` opens the Darknet ``.weights`` itself; ``onnxruntime`` and ``om`` share one
ONNX export with a static batch of 1 (the detector runs one image at a time), cached
in ``models_dir`` by the sha256 of weights and cfg; ``om`` converts it with ATC
(``tasks.atc.convert_to_om``), cached by the ONNX hash, soc and batch.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.backends import BACKENDS, DETECTOR_BACKENDS, load
from tasks.files import move_into_place, temporary_beside

from .darknet_cfg import DarknetCfg, Yolo, parse_darknet_cfg
from .onnx_runtime import INPUT_NAME, export_darknet_onnx, onnxruntime_net_fn
from .spec import YOLOV3_SPP
from .yolo import Darknet, NetFn, build_darknet, torch_net_fn


def detector_key(weights: str | Path, cfg: str | Path) -> str:
    """sha256 of the weights' bytes then the cfg's, first 16 hex digits: the cache key."""
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    h.update(Path(cfg).read_bytes())
    return h.hexdigest()[:16]


def detector_onnx(model: Darknet, weights: str | Path, cfg: str | Path, models_dir: str | Path,
                  inp: int = YOLOV3_SPP.inp) -> Path:
    """``models_dir/yolov3spp-<key>-b1.onnx``: exported on first use, written atomically."""
    path = Path(models_dir) / f"yolov3spp-{detector_key(weights, cfg)}-b1.onnx"
    if not path.is_file():
        tmp = temporary_beside(path)  # torch and onnx write to a path of their own choosing
        try:
            export_darknet_onnx(model, tmp, inp, batch_size=1)
            move_into_place(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def prepare_detector_model(backend: str, model: Darknet, weights: str | Path, cfg: str | Path,
                           models_dir: str | Path, soc_version: str | None = None,
                           convert: Callable | None = None) -> str:
    """The absolute path of the file ``open_detector`` opens for ``backend``; ``convert`` makes the OM
    (``tasks.atc.convert_to_om``'s signature; the driver's passes the conversion to a node with CANN)."""
    if backend == "torch":
        return str(Path(weights).resolve())
    if backend not in DETECTOR_BACKENDS:
        raise ValueError(f"unknown detector backend {backend!r}; choose one of {', '.join(DETECTOR_BACKENDS)}")
    onnx = detector_onnx(model, weights, cfg, models_dir)
    if backend == "onnxruntime":
        return str(onnx.resolve())
    from tasks.atc import convert_to_om

    inp = YOLOV3_SPP.inp
    return str((convert or convert_to_om)(onnx, models_dir, soc_version, batch_size=1, input_name=INPUT_NAME,
                             input_chw=(3, inp, inp)).resolve())


@dataclass
class Detector:
    """What ``detect_image`` needs: the network as a ``NetFn`` and the cfg's yolo heads."""

    net_fn: NetFn
    heads: tuple[Yolo, ...]
    close: Callable[[], None]


def open_detector(backend: str, model_path: str, cfg_path: str, device: str = "cpu", threads: int = 2) -> Detector:
    """One session on ``device`` ('cpu', 'cuda:0', 'npu:0': as this process sees it), from ``BACKENDS``."""
    opener = BACKENDS[backend].detector if backend in BACKENDS else None
    if opener is None:
        raise ValueError(f"unknown detector backend {backend!r}; choose one of {', '.join(DETECTOR_BACKENDS)}")
    return load(opener)(model_path, parse_darknet_cfg(cfg_path), device, threads)


def open_torch_detector(weights: str, cfg: DarknetCfg, device: str, threads: int) -> Detector:
    """The Darknet network itself; ``threads`` becomes torch's intra-op thread count for this
    process: 2 or more reproduce upstream's CPU sums (docs/numerics.md#detector-reproducibility)."""
    import torch

    torch.set_num_threads(max(1, threads))
    return Detector(torch_net_fn(build_darknet(cfg, weights), device), tuple(cfg.yolo_heads), lambda: None)


def open_onnx_detector(onnx_path: str, cfg: DarknetCfg, device: str, threads: int) -> Detector:
    return Detector(onnxruntime_net_fn(onnx_path, threads, device), tuple(cfg.yolo_heads), lambda: None)
