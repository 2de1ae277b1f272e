"""The detector network as an ATC-converted OM on one Ascend NPU, through ais_bench.

The OM comes from ``export_darknet_onnx(..., batch_size=1)`` and
``tasks.atc.convert_to_om(..., batch_size=1, input_name="input", input_chw=(3, 608, 608))``:
a static batch of one image, the raw head maps out in cfg order. Decode and
post-processing stay on the host (``yolo.decode_yolo_heads``, ``postprocess``), as
for every other backend. The model-file rules and the device id are the pose OM
backend's (``tasks.backends.om``): inside a Ray ``{"NPU": 1}`` actor the device is 0.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks.backends.sessions import OmModelError, om_session

from .darknet_cfg import DarknetCfg, Yolo
from .onnx_runtime import INPUT_NAME
from .runtime import Detector
from .spec import YOLOV3_SPP


def open_om_detector(om_path: str, cfg: DarknetCfg, device: str, threads: int) -> Detector:
    """The OM as a ``Detector``; ``threads`` is the host's, unused by the NPU."""
    om = DetectorOm(om_path, device, tuple(cfg.yolo_heads), YOLOV3_SPP.inp)
    return Detector(om, om.heads, om.close)


class DetectorOm:
    """A ``NetFn`` over one ais_bench ``InferSession``; ``close()`` frees it."""

    def __init__(self, om_path: str | Path, device: str, heads: Sequence[Yolo], inp: int = 608) -> None:
        self.path, self.heads = Path(om_path), tuple(heads)
        self.session = om_session(om_path, device)
        try:
            self.output_shapes = self._check(heads, inp)
        except OmModelError:
            self.close()
            raise

    def _check(self, heads: Sequence[Yolo], inp: int) -> list[tuple[int, ...]]:
        """One float32 ``[1, 3, inp, inp]`` input; one ``[1, A*(5+C), G, G]`` output per head."""
        name = self.path.name
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        want = [1, 3, inp, inp]
        kind = str(inputs[0].datatype).rpartition(".")[2] if len(inputs) == 1 else None
        if len(inputs) != 1 or kind != "float32" or list(inputs[0].shape) != want:
            got = [f"{str(i.datatype).rpartition('.')[2]} {list(i.shape)}" for i in inputs]
            raise OmModelError(f"OM {name} takes {', '.join(got)}; the detector needs one float32 {want} "
                               f"({INPUT_NAME!r}, static batch 1): convert it with tasks.atc.convert_to_om("
                               f"batch_size=1, input_name={INPUT_NAME!r}, input_chw=(3, {inp}, {inp}))")
        channels = [len(h.anchors) * (5 + h.classes) for h in heads]
        shapes = [tuple(int(d) for d in o.shape) for o in outputs]
        if len(shapes) != len(heads) or any(len(s) != 4 or s[0] != 1 or s[1] != c for s, c in zip(shapes, channels)):
            raise OmModelError(f"OM {name} returns {[list(s) for s in shapes]}; the cfg's {len(heads)} yolo heads "
                               f"need [1, C, G, G] maps with C = {channels}")
        return shapes

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        feed = np.ascontiguousarray(x, dtype=np.float32)
        outputs = self.session.infer([feed], "static")  # both ais_bench versions take this
        # ATC renames outputs: they are taken by position, in the ONNX's (cfg) order.
        return [np.asarray(o, dtype=np.float32).reshape(s) for o, s in zip(outputs, self.output_shapes)]

    def close(self) -> None:
        # finalize() is process-wide (docs/ascend.md#ais_bench-sessions): left to whoever owns the process.
        if getattr(self, "session", None) is not None and hasattr(self.session, "free_resource"):
            self.session.free_resource()
        self.session = None
