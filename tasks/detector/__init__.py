"""Person detector stage: AlphaPose's YOLOv3-SPP, numerically as upstream.

What each step computes, to the bit: docs/numerics.md (#letterbox, #detector-network,
#detector-decode, #detector-nms, #detector-records). Reading order:

- ``darknet_cfg.py``     ``.cfg`` text -> ``DarknetCfg`` (dataclass blocks)
- ``darknet_weights.py`` ``.weights`` header + float32 body -> the model's tensors
- ``yolo.py``            ``Darknet`` (input -> raw head maps), ``decode_yolo_heads``
- ``onnx_runtime.py``    the same network exported to ONNX and run with ONNX Runtime
- ``om_runtime.py``      that ONNX (static batch 1) converted by ATC, run through ais_bench
- ``runtime.py``         per backend: the model file to make once, the session to open per device
- ``preprocess.py``      image -> letterboxed float32 ``[1, 3, 608, 608]``
- ``postprocess.py``     rows -> person boxes (filter, NMS) -> image pixels -> records
- ``detect.py``          ``detect_image`` ties them together; ``write_detections``

Sharding over devices is not here: ``cluster/detect_actor.py`` runs ``detect_image`` on
a shard of images, ``runner/detect.py`` drives the shards (no Ray in ``tasks/``).

Vocabulary: a *row* is one decoded candidate ``(xc, yc, w, h, obj, p_0..p_79)``; a *box*
is ``(x1, y1, x2, y2, obj)``; a *record* is a COCO result dict with a ``[x, y, w, h]`` bbox.
"""
from tasks.dataset import ImageError

from .darknet_cfg import CfgError, DarknetCfg, parse_darknet_cfg
from .darknet_weights import WeightsError
from .detect import coco_image_list, detect_image, image_records, write_detections
from .onnx_runtime import export_darknet_onnx, onnxruntime_net_fn
from .preprocess import letterbox_bgr_to_rgb_input
from .runtime import Detector, open_detector, prepare_detector_model
from .spec import YOLOV3_SPP, DetectorSpec
from .yolo import Darknet, NetFn, build_darknet, torch_net_fn

__all__ = [
    "CfgError", "Darknet", "DarknetCfg", "Detector", "DetectorSpec", "ImageError", "NetFn", "WeightsError",
    "YOLOV3_SPP", "build_darknet", "coco_image_list", "detect_image", "export_darknet_onnx", "image_records",
    "letterbox_bgr_to_rgb_input", "onnxruntime_net_fn", "open_detector", "parse_darknet_cfg", "prepare_detector_model", "torch_net_fn",
    "write_detections",
]
