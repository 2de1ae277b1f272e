"""Person detector stage: AlphaPose's YOLOv3-SPP, numerically as upstream.

Spec: ``shared/spec/detector-yolov3spp.md``. Reading order:

- ``darknet_cfg.py``     ``.cfg`` text -> ``DarknetCfg`` (dataclass blocks)
- ``darknet_weights.py`` ``.weights`` header + float32 body -> the model's tensors
- ``yolo.py``            ``Darknet`` (input -> raw head maps), ``decode_yolo_heads``
- ``onnx_runtime.py``    the same network exported to ONNX and run with ONNX Runtime
- ``preprocess.py``      image -> letterboxed float32 ``[1, 3, 608, 608]``
- ``postprocess.py``     rows -> person boxes (filter, NMS) -> image pixels -> records
- ``detect.py``          ``detect_image`` ties them together; ``write_detections``

Vocabulary: a *row* is one decoded candidate ``(xc, yc, w, h, obj, p_0..p_79)``; a *box*
is ``(x1, y1, x2, y2, obj)``; a *record* is a COCO result dict with a ``[x, y, w, h]`` bbox.
"""
from .darknet_cfg import CfgError, DarknetCfg, parse_darknet_cfg
from .darknet_weights import WeightsError
from .detect import coco_image_list, detect_image, write_detections
from .onnx_runtime import export_darknet_onnx, onnxruntime_net_fn
from .preprocess import ImageError
from .spec import YOLOV3_SPP, DetectorSpec
from .yolo import Darknet, NetFn, build_darknet, torch_net_fn

__all__ = [
    "CfgError", "Darknet", "DarknetCfg", "DetectorSpec", "ImageError", "NetFn", "WeightsError",
    "YOLOV3_SPP", "build_darknet", "coco_image_list", "detect_image", "export_darknet_onnx",
    "onnxruntime_net_fn", "parse_darknet_cfg", "torch_net_fn", "write_detections",
]
