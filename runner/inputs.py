"""What a run is given, checked before Ray starts: boxes, images, checkpoint, backend, model file.

Every problem a user can fix is one line (RunError, DataError, CheckpointError) and stops
the run before any worker starts, with nothing written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runner.config import RunConfig
from runner.errors import RunError
from runner.plan import RunPlan
from tasks.dataset import BoxSet, DataError, load_boxes, missing_images, read_rgb
from tasks.export import ExportOptions, export_onnx
from tasks.files import atomic_file
from tasks.pipeline import prepare_batch

CHECKPOINT_HELP = ("fast_res50_256x192.pth (162,603,012 bytes, sha256 "
                   "42808e905aa20133a89a6a2cba073265a2ce35fabe65edffd9f153ef5846b7b0) from AlphaPose's "
                   "model zoo (docs/MODEL_ZOO.md, 'Fast Pose' ResNet-50 256x192)")
COCO_HELP = ("COCO val2017 from cocodataset.org/#download (val2017.zip into DATAROOT/val2017, "
             "annotations_trainval2017.zip into DATAROOT/annotations)")


def resolve_inputs(cfg: RunConfig) -> tuple[BoxSet, str, bool]:
    """The boxes, the checkpoint path and whether accuracy means anything (not synthetic)."""
    if cfg.data.synthetic:
        from tasks.synthetic import write_synthetic_coco

        root = Path(cfg.model.models_dir) / "synthetic" / f"n{cfg.data.synthetic}-seed{cfg.data.seed}"
        if not (root / "detections" / "dets.json").exists():
            write_synthetic_coco(root, cfg.data.synthetic, seed=cfg.data.seed, extra_dets_per_image=0)
        weights = random_checkpoint(cfg.model.models_dir, cfg.data.seed)
        return load_boxes(str(root), str(root / "detections" / "dets.json")), weights, False
    check_run_inputs(cfg)
    if cfg.data.dets and not Path(cfg.data.dets).exists():
        raise DataError(f"{cfg.data.dets}: detection file not found; give the right --dets, or --detector-weights "
                        "yolov3-spp.weights to write it with the detector first")
    return load_boxes(cfg.data.dataroot, cfg.data.dets, cfg.data.ann), cfg.model.weights, True


def random_checkpoint(models_dir: str, seed: int) -> str:
    """A seeded random FastPose in the released checkpoint's layout, written once into ``models_dir``."""
    weights = Path(models_dir) / f"fastpose-random-seed{seed}.pth"
    if not weights.exists():
        import torch

        from tasks.model import build_fastpose

        # Runs sharing a fresh models dir may write it at once: each whole, the same bytes.
        with atomic_file(weights, "wb") as f:
            torch.save(build_fastpose(seed=seed).state_dict(), f)
    return str(weights)


def check_run_inputs(cfg: RunConfig) -> None:
    """The inputs a real (not synthetic) run names are there and fit together; one line when not."""
    missing = []
    if not cfg.data.dataroot:
        missing.append("--dataroot (a COCO root)")
    elif not Path(cfg.data.dataroot).is_dir():
        missing.append(f"dataroot {cfg.data.dataroot}")
    if not cfg.model.weights:
        missing.append("--weights")
    elif not Path(cfg.model.weights).is_file():
        missing.append(f"weights {cfg.model.weights}")
    if not cfg.data.dets and cfg.data.boxes != "gt":
        missing.append("a box source (--dets FILE, --boxes gt, or --dets FILE with --detector-weights "
                       "yolov3-spp.weights to detect the boxes first)")
    if missing:
        raise RunError(f"missing {'; '.join(missing)}. Get {COCO_HELP} and {CHECKPOINT_HELP}; "
                       "or try the pipeline without them: python -m runner --synthetic 256")
    if cfg.data.dets and cfg.data.boxes == "gt":
        raise RunError("give either --dets FILE or --boxes gt, not both")
    if cfg.data.boxes not in (None, "gt"):
        raise RunError(f"--boxes {cfg.data.boxes!r}: the only box source besides --dets is 'gt'")


def check_images(box_set: BoxSet, skip_missing: bool) -> None:
    """Image files are checked before anything starts (issue 7's policy).

    A missing file stops the run unless ``--skip-missing-images``; then its boxes
    are reported as skipped and the mAP is marked incomplete.
    """
    missing = missing_images(box_set)
    if not missing:
        return
    if not skip_missing:
        raise DataError(f"{missing[0]}: image not found ({len(missing)} of {len(box_set.image_paths)} "
                        "images missing); fix the dataroot, or pass --skip-missing-images to run without them")
    from tasks.dataset import Skipped

    gone = set(missing)
    lost = {i for i, p in box_set.image_paths.items() if p in gone}
    box_set.skipped += [Skipped(b.id, b.image_id, f"{box_set.image_paths[b.image_id]}: image not found")
                        for b in box_set.boxes if b.image_id in lost]
    box_set.boxes = [b for b in box_set.boxes if b.image_id not in lost]


def check_crops(box_set: BoxSet, n: int = 4) -> np.ndarray:
    """Real crops for verifying an export: the first few boxes'."""
    boxes = box_set.boxes[:n]
    images = {i: read_rgb(box_set.image_paths[i]) for i in {b.image_id for b in boxes}}
    return prepare_batch(boxes, images).crops


def prepare_model(cfg: RunConfig, plan: RunPlan, weights: str, box_set: BoxSet, bs: int) -> str:
    """The file the backend opens, converted and cached on first use ('' for sim: none)."""
    backend, variant, models_dir = plan.backend, plan.variant, cfg.model.models_dir
    if backend == "sim":
        return ""
    if backend == "torch":
        return str(Path(weights).resolve())
    if backend in ("onnxruntime", "openvino"):
        options = ExportOptions(batch_size=None, variant=variant)
        return str(export_onnx(weights, models_dir, options, check_crops(box_set)).resolve())
    if backend == "om":
        from cluster.remote_atc import convert_where_cann_is

        # A dynamic-batch OM needs an ONNX whose batch ATC may set to -1: the symbolic-batch export.
        onnx = export_onnx(weights, models_dir, ExportOptions(batch_size=None if plan.gears else bs, variant=variant),
                           check_crops(box_set))
        # The uint8 variant takes NHWC crops: ND tells ATC not to read its dims as NCHW.
        layout = {"input_chw": variant.input_shape(bs)[1:], "input_format": "ND"} if variant.uint8_input else {}
        batch = {"gears": plan.gears} if plan.gears else {"batch_size": bs}
        # where the driver has no atc, an NPU node of the cluster converts (cluster.remote_atc)
        return str(convert_where_cann_is(onnx, models_dir, plan.soc_version, **batch, **layout,
                                         precision_mode=plan.precision_mode).resolve())
    raise RunError(f"unknown backend {backend!r}")


@dataclass
class Inputs:
    """What every run of a command shares: the boxes, the checkpoint, whether mAP means anything."""

    box_set: BoxSet
    weights: str
    evaluated: bool


def load_inputs(cfg: RunConfig) -> Inputs:
    box_set, weights, evaluated = resolve_inputs(cfg)
    check_images(box_set, cfg.data.skip_missing_images)
    if evaluated:  # before Ray starts: a wrong, truncated or unsafe file is named at once
        from tasks.model import check_checkpoint  # torch, imported only where a checkpoint is read

        check_checkpoint(weights)
    if not box_set.boxes:
        raise RunError(f"{box_set.source}: no usable boxes ({len(box_set.skipped)} skipped)")
    return Inputs(box_set, weights, evaluated)
