"""YOLOv3-SPP person boxes for every image of a COCO set, on the pose stage's devices.

``python -m runner detect`` writes the detection file the pose stage reads (``--dets``),
in upstream's format and order: images in ascending id order, each image's boxes by
score. A run (``python -m runner``) whose ``--dets FILE`` does not exist yet and that
has ``--detector-weights`` writes FILE the same way first (``plan_detection``,
``run_planned_detection``), in the same Ray session, then goes on with the pose stage.

Both run as the pose stage runs: ``cluster.session`` (a private Ray for ``--devices``,
or ``--address``), ``cluster.pool`` (one pinned ``cluster.worker.DeviceWorker`` per
device) and ``runner.control.run_stage`` (the shard queue, Ctrl-C, a lost or hung
worker's shards to the others). A shard is a run of consecutive images in ascending id
order; each image is detected on its own (batch 1), so the file is the same for any
number of devices. An image that cannot be read (truncated, undecodable, a read error
that does not pass) gets no detections: one log line names it, and
``FILE.skipped_images.json`` beside the detection file lists it with its reason.
PyTorch needs >= 2 threads to reproduce upstream's CPU sums (1 thread drifts by up to
4e-3 px), so a torch worker gets at least 2.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.placement import Placement, host_processes, opencv_threads
from cluster.pool import ActorPool, actor_pool
from cluster.queue import DispatchPolicy, DispatchReport
from cluster.remote_atc import convert_where_cann_is
from cluster.reducer import device_rows
from cluster.session import Session, ray_session
from runner.config import RunConfig, check_soc_version
from runner.control import StageLines, run_stage
from runner.errors import RunError
from runner.inputs import check_run_inputs
from runner.outputs import write_json
from runner.plan import choose_backend, soc_version
from tasks.backends import DETECTOR_BACKENDS
from tasks.dataset import ANNOTATIONS, IMAGES, DataError

if TYPE_CHECKING:  # the detector's worker imports torch: only where the detector runs
    from cluster.detect_actor import DetectShardResult, DetectWorkerConfig, ImageShard

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
    devices: dict[str, dict]  # per worker: images, boxes, busy_seconds, wall_seconds, lost, ... (detector_rows)
    lost_devices: list[str]
    skipped_images: list[dict]  # {image_id, file, reason}: read or decode refused, no detections
    seconds: float  # first dispatch to last result


def detect_on_session(session: Session, inputs: DetectInputs, backend: str, models_dir: str, threads: int,
                      log, policy: DispatchPolicy = DispatchPolicy()) -> DetectOutcome:
    """Detect every image on the session's devices and write the file atomically."""
    from cluster.detect_actor import DetectWorker  # torch: imported only where the detector runs
    from tasks.detector import prepare_detector_model

    job = inputs.job
    model_path = prepare_detector_model(backend, inputs.model, job.weights, inputs.cfg_path, models_dir,
                                        soc_version(session.devices) if backend == "om" else None,
                                        convert_where_cann_is)
    inputs.model = None  # the workers load their own; the driver's copy (~250 MB) is not kept for the pose stage
    with actor_pool(session, DetectWorker, backend, threads, log=log) as pool:
        pool.start(lambda p: detect_worker_config(p, backend, model_path, inputs, session.cpus_per_worker))
        return detect_with(pool, inputs, backend, log, policy)


def detect_worker_config(p: Placement, backend: str, model_path: str, inputs: DetectInputs,
                         cpus_per_worker: float) -> DetectWorkerConfig:
    """PyTorch needs >= 2 threads to reproduce upstream's CPU sums (docs/numerics.md#detector-reproducibility),
    so a torch worker gets 2 at least. Host processes are sized as the pose stage's are."""
    from cluster.detect_actor import DetectWorkerConfig

    processes = host_processes(0, p.compute_device, backend, cpus_per_worker)
    place = p.place(threads=max(2, p.threads) if backend == "torch" else p.threads,
                    opencv_threads=opencv_threads(processes, p.compute_device, backend, cpus_per_worker))
    return DetectWorkerConfig(place=place, model_path=model_path, cfg_path=str(inputs.cfg_path.resolve()),
                              host_processes=processes)


def image_shards(images: list[tuple[Path, int]], workers: int, shard_size: int) -> list[ImageShard]:
    """Runs of consecutive images in ascending id order: ``shard_size``, or at most 8 and four per worker."""
    from cluster.detect_actor import ImageShard

    per = shard_size or max(1, min(MAX_IMAGES_PER_SHARD, math.ceil(len(images) / (4 * workers))))
    return [ImageShard(k, [(str(p), i) for p, i in images[start:start + per]])
            for k, start in enumerate(range(0, len(images), per))]


def detect_with(pool: ActorPool, inputs: DetectInputs, backend: str, log, policy: DispatchPolicy) -> DetectOutcome:
    """Every image through the pool's workers, the file written in image order."""
    job, images, workers = inputs.job, inputs.images, list(pool.actors)
    log("detector workers: " + ", ".join(f"{d['device']} pid {d['pid']} on {d['node']}" for d in pool.current()))
    shards = image_shards(images, len(workers), job.shard_size)
    log(f"detector: {len(images)} images in {len(shards)} shards on {', '.join(workers)}; backend {backend}")
    if "npu" in {d.kind for d in pool.session.devices} and backend != "om":
        log(f"note: backend {backend} computes on the CPU; the NPU slots only place the detector workers")
    progress = DetectProgress(len(images), log)

    def on_failed(shard: ImageShard, why: str) -> None:
        raise RunError(f"detector: shard {shard.id} ({len(shard.images)} images from id {shard.images[0][1]}) "
                       f"failed on every try ({why}); {ALL_LOST}")

    lines = StageLines(interrupted=lambda: (f"interrupted: {len(progress.results)} of {len(shards)} detector shards "
                                            "done; no detection file was written: rerun the command"),
                       all_lost=ALL_LOST)
    report = run_stage(pool, shards, progress.add, log, policy, on_failed, lines)
    return write_detection_file(job, [progress.results[k] for k in sorted(progress.results)], pool, report, log,
                                time.time() - progress.started)


class DetectProgress:
    """The shards' results as they come, and a line each 5% of the images."""

    def __init__(self, images: int, log) -> None:
        self.images, self.log, self.results = images, log, {}
        self.done = self.boxes = 0
        self.step, self.started = max(1, images // 20), time.time()

    def add(self, r: DetectShardResult) -> None:
        for skipped in r.unreadable:
            self.log(f"{skipped['reason']} (image id {skipped['image_id']}): no detections for it")
        self.results[r.shard_id] = r
        before, self.done, self.boxes = self.done, self.done + r.images, self.boxes + len(r.records)
        if self.done // self.step != before // self.step or self.done == self.images:
            self.log(f"  {self.done}/{self.images} images, {self.boxes} boxes, "
                     f"{self.done / (time.time() - self.started):.2f} images/s")


def skipped_images_path(out: str | Path) -> Path:
    """Beside the detection file: ``dets.json`` -> ``dets.skipped_images.json``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.skipped_images.json")


def write_detection_file(job: DetectJob, ordered: list[DetectShardResult], pool: ActorPool, report: DispatchReport,
                         log, seconds: float) -> DetectOutcome:
    """The detection file in image order; the images that could not be read in a record beside it."""
    from tasks.detector import write_detections

    records = [rec for r in ordered for rec in r.records]
    skipped = [s for r in ordered for s in r.unreadable]
    write_detections(job.out, records)
    if skipped:
        write_json(skipped_images_path(job.out), {"skipped_images": skipped})
    else:
        skipped_images_path(job.out).unlink(missing_ok=True)  # a record of an earlier run would be wrong now
    rows = detector_rows(ordered, pool.described, report)
    for row in rows:
        log(f"  {row['id']:>10}: {row['images']} images, {row['boxes']} boxes, {row['busy_seconds']:.2f} s busy, "
            f"{row['images_per_busy_s']:.2f} images/s{' (lost)' if row['lost'] else ''}")
    images = sum(r.images for r in ordered)
    note = f"; {len(skipped)} images unreadable, listed in {skipped_images_path(job.out)}" if skipped else ""
    log(f"{len(records)} person boxes on {images} images in {seconds:.1f} s -> {job.out}{note}")
    return DetectOutcome(Path(job.out), images, len(records), {row["id"]: row for row in rows}, list(report.lost),
                         skipped, seconds)


def detector_rows(results: list[DetectShardResult], described: list[dict], report: DispatchReport) -> list[dict]:
    """Per worker: the common device figures (``cluster.reducer.device_rows``) plus images and boxes."""
    rows = []
    for row, mine in device_rows(results, described, report.lost):
        images = sum(r.images for r in mine)
        row.update(images=images, boxes=sum(len(r.records) for r in mine),
                   images_per_busy_s=images / row["busy_seconds"] if row["busy_seconds"] else 0.0)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- in a pose run


def plan_detection(cfg: RunConfig, log) -> DetectInputs | None:
    """Before Ray: the checked detector inputs when the run must first write ``--dets``; else None.

    That is when ``--detector-weights`` is given and the ``--dets`` file does not exist
    yet; an existing file is used as it is (upstream reuses its file the same way).
    The pose side's inputs are checked here too, so a bad checkpoint stops the run
    before the detector spends its time.
    """
    data = cfg.data
    if not data.detector_weights:
        return None
    if data.synthetic:
        raise RunError("--detector-weights detects the boxes of a COCO root (--dataroot); --synthetic makes its own")
    if data.boxes == "gt":
        raise RunError("give either --boxes gt or --detector-weights, not both")
    if not data.dets:
        raise RunError("--detector-weights needs --dets FILE: the detection file the detector writes when it "
                       "does not exist yet (and later runs read)")
    if Path(data.dets).exists():
        log(f"{data.dets}: exists, used as it is (the detector runs only when the file is absent)")
        return None
    from tasks.model import check_checkpoint

    check_run_inputs(cfg)
    check_checkpoint(cfg.model.weights)
    job = DetectJob(data.dataroot, data.ann, data.detector_weights, data.detector_cfg, data.dets,
                    flags=("--detector-weights", "--detector-cfg"))
    return check_detect_inputs(job)


def run_planned_detection(plan: DetectInputs, session: Session, cfg: RunConfig, backend: str, log) -> DetectOutcome:
    """Write ``--dets`` with the detector on the run's session and devices, on the run's backend.

    A pose backend the detector has no runtime for (openvino, sim) detects with ONNX Runtime.
    """
    log(f"{cfg.data.dets}: not there yet: detecting the persons of {len(plan.images)} images first")
    if backend not in DETECTOR_BACKENDS:
        log(f"note: the detector has no {backend} backend; it runs on onnxruntime")
        backend = "onnxruntime"
    return detect_on_session(session, plan, backend, cfg.model.models_dir, cfg.backend.threads, log, cfg.queue)


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
    check_soc_version(args.soc_version)
    inputs = check_detect_inputs(DetectJob(args.dataroot, args.ann, args.weights, args.cfg, args.out,
                                           args.shard_size))
    with ray_session(args.devices, args.address, args.soc_version) as session:
        backend = choose_backend(args.backend, session.devices)
        detect_on_session(session, inputs, backend, args.models_dir, args.threads, log)
    return 0
