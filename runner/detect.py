"""YOLOv3-SPP person boxes for every image of a COCO set, on the pose stage's devices.

``python -m runner detect`` writes the detection file the pose stage reads (``--dets``),
in upstream's format and order: images in ascending id order, each image's boxes by
score. A run (``python -m runner``) whose ``--dets FILE`` does not exist yet and that
has ``--detector-weights`` writes FILE the same way first (``plan_detection``,
``run_planned_detection``), in the same Ray session, then goes on with the pose stage.

Both use the pose stage's cluster/ machinery unchanged: ``cluster.session`` (a private
Ray for ``--devices``, or ``--address``), ``cluster.pool`` (one pinned actor per device,
the pose workers' resources and visibility variables) and ``cluster.dispatch`` (two
shards in flight per actor; a lost or hung actor's shards go to the others). A shard is a run of
consecutive images in ascending id order; each image is detected on its own (batch
1), so the file is the same for any number of devices. PyTorch needs >= 2 threads to
reproduce upstream's CPU sums (spec §10: 1 thread drifts by up to 4e-3 px), so a
torch worker gets at least 2.
"""
from __future__ import annotations

import argparse
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from runner.config import RunConfig, load_config
from cluster.dispatch import DispatchPolicy, dispatch
from cluster.errors import AllDevicesLost, Stopped
from cluster.pool import actor_pool
from cluster.session import Session
from runner.control import ctrl_c_stops, dispatch_policy, session_for
from runner.errors import Interrupted, RunError
from runner.inputs import check_run_inputs, choose_backend, soc_version
from tasks.dataset import ANNOTATIONS, IMAGES, DataError

#: A shard holds at most this many images; fewer when that keeps every worker busy.
MAX_IMAGES_PER_SHARD = 8
ALL_LOST = "no detection file was written: rerun the command (detection starts over)"


@dataclass(frozen=True)
class DetectJob:
    dataroot: str
    ann: str | None
    weights: str
    cfg: str | None  # default: yolov3-spp.cfg beside the weights
    out: str  # the detection file
    shard_size: int = 0  # images per shard; 0: automatic
    flags: tuple[str, str] = ("--weights", "--cfg")  # how the command line names weights and cfg


@dataclass
class DetectInputs:
    """A job whose files were all checked before Ray starts, with the network it loads."""

    job: DetectJob
    cfg_path: Path
    images: list[tuple[Path, int]]  # ascending image id
    model: object | None  # tasks.detector.Darknet with the weights: validated, and exported for ONNX / OM


def check_detect_inputs(job: DetectJob) -> DetectInputs:
    """Every file the detector needs, checked (one line each): cfg, weights, annotations, images."""
    from tasks.detector import build_darknet, coco_image_list

    weights_flag, cfg_flag = job.flags
    cfg = Path(job.cfg) if job.cfg else Path(job.weights).with_name("yolov3-spp.cfg")
    for path, what in ((Path(job.weights), weights_flag), (cfg, f"{cfg_flag} (Darknet yolov3-spp.cfg)")):
        if not path.is_file():
            raise DataError(f"{path}: {what} not found")
    ann = job.ann or str(Path(job.dataroot) / ANNOTATIONS)
    if not Path(ann).is_file():
        raise DataError(f"{ann}: annotation file not found")
    try:
        images = coco_image_list(ann, Path(job.dataroot) / IMAGES)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{ann}: not a COCO annotation file with an 'images' list ({e})") from None
    if not images:
        raise DataError(f"{ann}: lists no images")
    missing = [p for p, _ in images if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: image not found ({len(missing)} of {len(images)} images missing); "
                        "fix the dataroot")
    out = Path(job.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"{out}: cannot write the detection file there ({e.strerror}); choose another path") from None
    if not os.access(out.parent, os.W_OK):
        raise RunError(f"{out}: cannot write the detection file there (permission denied); choose another path")
    return DetectInputs(job, cfg, images, build_darknet(cfg, job.weights))


@dataclass
class DetectOutcome:
    out: Path
    images: int
    boxes: int
    devices: dict[str, dict]  # label -> images, boxes, busy_seconds, lost
    lost_devices: list[str]
    seconds: float  # first dispatch to last result


def detect_on_session(session: Session, inputs: DetectInputs, backend: str, models_dir: str, threads: int,
                      log, policy: DispatchPolicy = DispatchPolicy()) -> DetectOutcome:
    """Detect every image on the session's devices and write the file atomically."""
    from cluster.detect_actor import DetectWorker, DetectWorkerConfig
    from tasks.detector import prepare_detector_model

    job = inputs.job
    model_path = prepare_detector_model(backend, inputs.model, job.weights, inputs.cfg_path, models_dir,
                                        soc_version(session.devices) if backend == "om" else None)
    cfg_path = str(inputs.cfg_path.resolve())
    inputs.model = None  # the workers load their own; the driver's copy (~250 MB) is not kept for the pose stage

    def worker_config(p) -> DetectWorkerConfig:
        return DetectWorkerConfig(backend, model_path, cfg_path, p.in_process, p.label, p.device.kind,
                                  max(2, p.threads) if backend == "torch" else p.threads)

    # One shard at a time per actor: dispatch's second shard waits in the actor's queue.
    with actor_pool(session, DetectWorker, backend, threads, max_concurrency=1) as pool:
        return _detect_with(pool, pool.start(worker_config), inputs, backend, log, policy)


def _detect_with(pool, described: list[dict], inputs: DetectInputs, backend: str, log,
                 policy: DispatchPolicy) -> DetectOutcome:
    from cluster.detect_actor import ImageShard
    from tasks.detector import write_detections

    job, session, actors = inputs.job, pool.session, list(pool.actors)
    log("detector workers: " + ", ".join(f"{d['device']} pid {d['pid']} on {d['node']}" for d in described))
    images = inputs.images
    per = job.shard_size or max(1, min(MAX_IMAGES_PER_SHARD, math.ceil(len(images) / (4 * len(actors)))))
    shards = deque(ImageShard(k, [(str(p), i) for p, i in images[start:start + per]])
                   for k, start in enumerate(range(0, len(images), per)))
    n_shards = len(shards)
    log(f"detector: {len(images)} images in {n_shards} shards on {', '.join(actors)}; backend {backend}")
    if "npu" in {d.kind for d in session.devices} and backend != "om":
        log(f"note: backend {backend} computes on the CPU; the NPU slots only place the detector workers")
    results: dict[int, object] = {}
    done = boxes = 0
    step = max(1, len(images) // 20)
    started = time.time()

    def on_result(r) -> None:
        nonlocal done, boxes
        if r.unreadable:
            image_id, reason = r.unreadable[0]
            raise DataError(f"{reason} (image id {image_id}); fix or replace the file, then rerun")
        results[r.shard_id] = r
        before, done, boxes = done, done + r.images, boxes + len(r.records)
        if done // step != before // step or done == len(images):
            log(f"  {done}/{len(images)} images, {boxes} boxes, {done / (time.time() - started):.2f} images/s")

    def on_failed(shard, why: str) -> None:
        raise RunError(f"detector: shard {shard.id} ({len(shard.images)} images from id {shard.images[0][1]}) "
                       f"failed on every try ({why}); {ALL_LOST}")

    stop = threading.Event()
    try:
        with ctrl_c_stops(stop):
            lost = list(dispatch(pool, shards, on_result, log, policy, on_failed, stop).lost)
    except AllDevicesLost as e:
        raise RunError(f"{e}; {ALL_LOST}") from None
    except (Stopped, KeyboardInterrupt):
        raise Interrupted(f"interrupted: {len(results)} of {n_shards} detector shards done; no detection "
                          "file was written: rerun the command") from None
    seconds = time.time() - started
    if sorted(results) != list(range(n_shards)):  # dispatch returns only when every shard is done
        raise RunError(f"detector: {n_shards - len(results)} of {n_shards} shards have no result; rerun the command")
    ordered = [results[k] for k in sorted(results)]
    records = [rec for r in ordered for rec in r.records]
    write_detections(job.out, records)
    per_device = {label: {"images": 0, "boxes": 0, "busy_seconds": 0.0, "lost": label in lost} for label in actors}
    for r in ordered:
        d = per_device[r.device]
        d["images"] += r.images
        d["boxes"] += len(r.records)
        d["busy_seconds"] += r.busy_seconds
    for label, d in per_device.items():
        rate = d["images"] / d["busy_seconds"] if d["busy_seconds"] else 0.0
        log(f"  {label:>10}: {d['images']} images, {d['boxes']} boxes, {d['busy_seconds']:.2f} s busy, "
            f"{rate:.2f} images/s{' (lost)' if d['lost'] else ''}")
    log(f"{len(records)} person boxes on {len(images)} images in {seconds:.1f} s -> {job.out}")
    return DetectOutcome(Path(job.out), len(images), len(records), per_device, lost, seconds)


# ---------------------------------------------------------------- in a pose run


def plan_detection(cfg: RunConfig, log) -> DetectInputs | None:
    """Before Ray: the checked detector inputs when the run must first write ``--dets``; else None.

    That is when ``--detector-weights`` is given and the ``--dets`` file does not exist
    yet; an existing file is used as it is (upstream reuses its file the same way).
    The pose side's inputs are checked here too, so a bad checkpoint stops the run
    before the detector spends its time.
    """
    if not cfg.detector_weights:
        return None
    if cfg.synthetic:
        raise RunError("--detector-weights detects the boxes of a COCO root (--dataroot); --synthetic makes its own")
    if cfg.boxes == "gt":
        raise RunError("give either --boxes gt or --detector-weights, not both")
    if not cfg.dets:
        raise RunError("--detector-weights needs --dets FILE: the detection file the detector writes when it "
                       "does not exist yet (and later runs read)")
    if Path(cfg.dets).exists():
        log(f"{cfg.dets}: exists, used as it is (the detector runs only when the file is absent)")
        return None
    from tasks.model import check_checkpoint

    check_run_inputs(cfg)
    check_checkpoint(cfg.weights)
    job = DetectJob(cfg.dataroot, cfg.ann, cfg.detector_weights, cfg.detector_cfg, cfg.dets,
                    flags=("--detector-weights", "--detector-cfg"))
    return check_detect_inputs(job)


def run_planned_detection(plan: DetectInputs, session: Session, cfg: RunConfig, backend: str, log) -> DetectOutcome:
    """Write ``--dets`` with the detector on the run's session and devices, on the run's backend.

    A pose backend the detector has no runtime for (openvino, sim) detects with ONNX Runtime.
    """
    from tasks.detector.runtime import BACKENDS

    log(f"{cfg.dets}: not there yet: detecting the persons of {len(plan.images)} images first")
    if backend not in BACKENDS:
        log(f"note: the detector has no {backend} backend; it runs on onnxruntime")
        backend = "onnxruntime"
    return detect_on_session(session, plan, backend, cfg.models_dir, cfg.threads, log, dispatch_policy(cfg))


# ---------------------------------------------------------------- python -m runner detect


def detect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runner detect",
                                description="AlphaPose's YOLOv3-SPP person detector (input 608, confidence 0.1, "
                                            "NMS 0.6) -> a COCO detection file, on every device you name.")
    p.add_argument("--dataroot", required=True, help="COCO root holding val2017/ and annotations/")
    p.add_argument("--ann", help="annotation file (default DATAROOT/annotations/person_keypoints_val2017.json)")
    p.add_argument("--weights", required=True, help="Darknet yolov3-spp.weights")
    p.add_argument("--cfg", help="Darknet yolov3-spp.cfg (default: beside the weights)")
    p.add_argument("--out", required=True, help="the detection file to write (JSON)")
    p.add_argument("--devices", default="cpu", help="0,1 (NPU ids) | all | cuda:0,1 | cpu | cpu:N (default cpu)")
    p.add_argument("--backend", choices=["auto", "torch", "onnxruntime", "om"], default="torch",
                   help="torch (default: upstream's numbers on 2+ threads), onnxruntime, om (NPUs), "
                        "auto (om on NPUs, else onnxruntime)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per worker (default: its share of the cores; torch at least 2)")
    p.add_argument("--shard-size", type=int, default=0, help="images per shard (default: automatic, at most 8)")
    p.add_argument("--soc-version", metavar="SOC",
                   help="ATC soc_version of the NPUs, e.g. Ascend310P3 (default: from npu-smi, or Ray on a cluster)")
    p.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT")
    p.add_argument("--models-dir", default="models", help="cache of the exported ONNX / OM detector")
    p.add_argument("--quiet", action="store_true")
    return p


def main_detect(argv: list[str]) -> int:
    args = detect_parser().parse_args(argv)
    if args.threads < 0 or args.shard_size < 0:
        raise RunError("--threads and --shard-size take a non-negative integer (0: automatic)")
    log = (lambda *a, **k: None) if args.quiet else print
    # The run's configuration as far as Ray and the workers read it.
    cfg = load_config(None, {"devices": args.devices, "address": args.address, "threads": args.threads,
                             "backend": args.backend, "models_dir": args.models_dir, "quiet": args.quiet,
                             "soc_version": args.soc_version})
    inputs = check_detect_inputs(DetectJob(args.dataroot, args.ann, args.weights, args.cfg, args.out,
                                           args.shard_size))
    with session_for(cfg) as session:
        backend = choose_backend(args.backend, session.devices)
        detect_on_session(session, inputs, backend, cfg.models_dir, cfg.threads, log)
    return 0
