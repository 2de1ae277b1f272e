"""``python -m runner detect``: YOLOv3-SPP person boxes for every image of a COCO set.

Writes the detection file the pose stage reads (``--dets``), in upstream's format
and order: images in ascending id order, each image's boxes by score.
This first version runs in one process; PyTorch needs >= 2 threads to reproduce
upstream's CPU sums (the spec's measurement: 1 thread drifts by up to 4e-3 px).
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from tasks.dataset import ANNOTATIONS, IMAGES, DataError


def detect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runner detect",
                                description="AlphaPose's YOLOv3-SPP person detector (input 608, "
                                            "confidence 0.1, NMS 0.6) -> a COCO detection file.")
    p.add_argument("--dataroot", required=True, help="COCO root holding val2017/ and annotations/")
    p.add_argument("--ann", help="annotation file (default DATAROOT/annotations/person_keypoints_val2017.json)")
    p.add_argument("--weights", required=True, help="Darknet yolov3-spp.weights")
    p.add_argument("--cfg", help="Darknet yolov3-spp.cfg (default: beside the weights)")
    p.add_argument("--out", required=True, help="the detection file to write (JSON)")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (>= 2 reproduces upstream)")
    p.add_argument("--models-dir", default="models", help="cache of the exported ONNX detector")
    p.add_argument("--quiet", action="store_true")
    return p


def main_detect(argv: list[str]) -> int:
    import torch

    from tasks.detector import (build_darknet, coco_image_list, detect_image, export_darknet_onnx,
                                onnxruntime_net_fn, torch_net_fn, write_detections)

    args = detect_parser().parse_args(argv)
    cfg = Path(args.cfg) if args.cfg else Path(args.weights).with_name("yolov3-spp.cfg")
    for path, what in ((cfg, "--cfg (Darknet yolov3-spp.cfg)"), (Path(args.weights), "--weights")):
        if not path.is_file():
            raise DataError(f"{path}: {what} not found")
    ann = args.ann or str(Path(args.dataroot) / ANNOTATIONS)
    if not Path(ann).is_file():
        raise DataError(f"{ann}: annotation file not found")
    torch.set_num_threads(max(1, args.threads))
    model = build_darknet(cfg, args.weights)
    if args.backend == "torch":
        net_fn = torch_net_fn(model)
    else:
        key = hashlib.sha256(Path(args.weights).read_bytes() + cfg.read_bytes()).hexdigest()[:16]
        onnx = Path(args.models_dir) / f"yolov3spp-{key}.onnx"
        if not onnx.exists():
            export_darknet_onnx(model, onnx)
        net_fn = onnxruntime_net_fn(onnx, args.threads)
    images = coco_image_list(ann, Path(args.dataroot) / IMAGES)
    records: list[dict] = []
    started = time.time()
    for k, (path, image_id) in enumerate(images, 1):
        records += detect_image(net_fn, path, image_id, model.cfg.yolo_heads)
        if not args.quiet and (k % 50 == 0 or k == len(images)):
            print(f"  {k}/{len(images)} images, {len(records)} boxes, {k / (time.time() - started):.2f} images/s")
    write_detections(args.out, records)
    if not args.quiet:
        print(f"{len(records)} person boxes on {len(images)} images -> {args.out}")
    return 0
