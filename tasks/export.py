"""Checkpoint -> ONNX -> onnxsim, verified against PyTorch and cached.

The cache key is the checkpoint's sha256 plus every export option, so a new
checkpoint or option never reuses a stale file. Next to each model a ``.json``
records how it was made and how far it is from PyTorch.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tasks.deploy import deployed_module
from tasks.errors import UserError
from tasks.files import atomic_file, file_sha256
from tasks.spec import FASTPOSE
from tasks.transforms import crops_to_input
from tasks.variant import Variant

INPUT_NAME = "image"
OUTPUT_NAME = "heatmaps"
MAX_ABS_DIFF = 1e-3


class ExportError(UserError, RuntimeError):
    """Export failed or the exported model disagrees with PyTorch; one line."""


@dataclass(frozen=True)
class ExportOptions:
    batch_size: int | None = None  # None: a dynamic batch dimension
    opset: int = 11  # what ATC's published recipe for this model uses
    simplify: bool = True
    variant: Variant = Variant()  # fused flip and/or uint8 input in the graph (tasks.deploy)

    def tag(self) -> str:
        bs = "dyn" if self.batch_size is None else f"b{self.batch_size}"
        return f"{bs}-op{self.opset}" + ("-sim" if self.simplify else "") + self.variant.tag()


def onnx_path_for(checkpoint: str, models_dir: str, options: ExportOptions, sha256: str | None = None) -> Path:
    sha = sha256 or file_sha256(checkpoint)
    return Path(models_dir) / f"fastpose-{sha[:16]}-{options.tag()}.onnx"


def export_onnx(checkpoint: str, models_dir: str, options: ExportOptions,
                check_crops: np.ndarray) -> Path:
    """The cached ONNX for ``checkpoint``; exported, simplified and verified when missing.

    ``check_crops``: uint8 ``[n, 256, 192, 3]``, real crops where there are any.
    The model is refused (not cached) if ONNX Runtime's heatmaps differ from
    PyTorch's by more than 1e-3 on them.
    """
    sha = file_sha256(checkpoint)
    out = onnx_path_for(checkpoint, models_dir, options, sha)
    if out.exists() and out.with_suffix(".json").exists():
        return out
    import io

    import onnx
    import torch

    from tasks.model import build_fastpose  # torch: only an export pays its import

    variant = options.variant
    model = deployed_module(build_fastpose(checkpoint), variant)
    n = options.batch_size or len(check_crops)
    crops = np.resize(check_crops, (n, *check_crops.shape[1:])).astype(np.uint8)
    x = crops if variant.uint8_input else crops_to_input(crops)
    dynamic = None if options.batch_size else {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    buf = io.BytesIO()
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    # The TorchScript exporter: torch 2.13's default (dynamo) one needs onnxscript.
    torch.onnx.export(model, (torch.from_numpy(x),), buf, input_names=[INPUT_NAME],
                      output_names=[OUTPUT_NAME], dynamic_axes=dynamic, opset_version=options.opset,
                      dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    if options.simplify:
        import onnxsim

        shapes = {INPUT_NAME: list(x.shape)} if options.batch_size else None
        proto, ok = onnxsim.simplify(proto, overwrite_input_shapes=shapes)
        if not ok:
            raise ExportError(f"onnxsim could not validate the simplified model of {checkpoint}")
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()

    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: x})[0]
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= MAX_ABS_DIFF:
        raise ExportError(f"exported ONNX differs from PyTorch by {diff:.2e} (> {MAX_ABS_DIFF}) on "
                          f"{n} crops; not cached. Check the onnx/onnxruntime versions")
    info = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha, "options": asdict(options),
            "input": {"name": INPUT_NAME, "dtype": np.dtype(variant.input_dtype()).name,
                      "shape": variant.input_shape(options.batch_size or "N")},
            "output": {"name": OUTPUT_NAME, "shape": [options.batch_size or "N", FASTPOSE.num_joints,
                                                       *FASTPOSE.heatmap_hw]},
            "max_abs_diff_vs_torch": diff, "check_crops": n,
            "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}
    _write_bytes(out, data)
    _write_bytes(out.with_suffix(".json"), json.dumps(info, indent=2).encode())
    return out


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)
