"""``run(cfg)``: boxes -> shards -> one worker per device -> merge -> OKS-NMS -> COCOeval -> OUT.

This module composes a run: it checks the inputs, converts the model, cuts the
boxes into shards of whole batches, hands them to cluster/ (the Ray session, the
workers and the shard queue) and writes what comes back. Everything the run writes
to OUT is written atomically; finished shards are journalled for ``--resume``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from cluster.actor import Shard, ShardResult, Worker, WorkerConfig
from cluster.devices import Device
from cluster.dispatch import DispatchPolicy, DispatchReport, dispatch
from cluster.errors import AllDevicesLost, Stopped
from cluster.placement import Placement, compute_device, prep_threads
from cluster.pool import ActorPool, actor_pool
from cluster.reducer import format_throughput, merge_shards, throughput
from cluster.session import Session, ray_session
from runner.config import RunConfig
from runner.journal import Journal, atomic_write_text
from runner.progress import Progress
from tasks.dataset import BoxSet, DataError, load_boxes, missing_images, read_rgb
from tasks.evaluation import STAT_NAMES, evaluate_keypoints, pose_records, rescore_and_nms
from tasks.deploy import Variant
from tasks.export import ExportOptions, export_onnx
from tasks.model import build_fastpose, check_checkpoint, file_sha256
from tasks.pipeline import prepare_batch

CHECKPOINT_HELP = ("fast_res50_256x192.pth (162,603,012 bytes, sha256 "
                   "42808e905aa20133a89a6a2cba073265a2ce35fabe65edffd9f153ef5846b7b0) from AlphaPose's "
                   "model zoo (docs/MODEL_ZOO.md, 'Fast Pose' ResNet-50 256x192)")
COCO_HELP = ("COCO val2017 from cocodataset.org/#download (val2017.zip into DATAROOT/val2017, "
             "annotations_trainval2017.zip into DATAROOT/annotations)")


class RunError(RuntimeError):
    """The run cannot go on; one line for the user."""


class Interrupted(RunError):
    pass


@dataclass
class RunOutcome:
    out: Path
    metrics: dict
    throughput: dict
    lost_devices: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- inputs


def resolve_inputs(cfg: RunConfig) -> tuple[BoxSet, str, bool]:
    """The boxes, the checkpoint path and whether accuracy means anything (not synthetic)."""
    if cfg.synthetic:
        from tasks.synthetic import write_synthetic_coco

        root = Path(cfg.models_dir) / "synthetic" / f"n{cfg.synthetic}-seed{cfg.seed}"
        if not (root / "detections" / "dets.json").exists():
            write_synthetic_coco(root, cfg.synthetic, seed=cfg.seed, extra_dets_per_image=0)
        weights = Path(cfg.models_dir) / f"fastpose-random-seed{cfg.seed}.pth"
        if not weights.exists():
            import torch

            weights.parent.mkdir(parents=True, exist_ok=True)
            tmp = weights.with_suffix(".tmp")
            torch.save(build_fastpose(seed=cfg.seed).state_dict(), tmp)
            os.replace(tmp, weights)
        return load_boxes(str(root), str(root / "detections" / "dets.json")), str(weights), False
    check_run_inputs(cfg)
    if cfg.dets and not Path(cfg.dets).exists():
        raise DataError(f"{cfg.dets}: detection file not found; give the right --dets, or --detector-weights "
                        "yolov3-spp.weights to write it with the detector first")
    return load_boxes(cfg.dataroot, cfg.dets, cfg.ann), cfg.weights, True


def check_run_inputs(cfg: RunConfig) -> None:
    """The inputs a real (not synthetic) run names are there and fit together; one line when not."""
    missing = []
    if not cfg.dataroot:
        missing.append("--dataroot (a COCO root)")
    elif not Path(cfg.dataroot).is_dir():
        missing.append(f"dataroot {cfg.dataroot}")
    if not cfg.weights:
        missing.append("--weights")
    elif not Path(cfg.weights).is_file():
        missing.append(f"weights {cfg.weights}")
    if not cfg.dets and cfg.boxes != "gt":
        missing.append("a box source (--dets FILE, --boxes gt, or --dets FILE with --detector-weights "
                       "yolov3-spp.weights to detect the boxes first)")
    if missing:
        raise RunError(f"missing {'; '.join(missing)}. Get {COCO_HELP} and {CHECKPOINT_HELP}; "
                       "or try the pipeline without them: python -m runner --synthetic 256")
    if cfg.dets and cfg.boxes == "gt":
        raise RunError("give either --dets FILE or --boxes gt, not both")
    if cfg.boxes not in (None, "gt"):
        raise RunError(f"--boxes {cfg.boxes!r}: the only box source besides --dets is 'gt'")


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


def choose_backend(name: str, devices: list[Device]) -> str:
    """``auto``: OM on NPUs, else ONNX Runtime (faster than PyTorch on CPU, measured)."""
    kinds = {d.kind for d in devices}
    if len(kinds) > 1:
        raise RunError(f"--devices mixes {', '.join(sorted(kinds))}; run one kind per command")
    if name != "auto":
        return name
    return "om" if "npu" in kinds else "onnxruntime"


def check_crops(box_set: BoxSet, n: int = 4) -> np.ndarray:
    """Real crops for verifying an export: the first few boxes'."""
    boxes = box_set.boxes[:n]
    images = {i: read_rgb(box_set.image_paths[i]) for i in {b.image_id for b in boxes}}
    return prepare_batch(boxes, images).crops


#: Backends whose uint8-input model gives the float model's keypoints bit for bit on a CPU
#: (tests/test_throughput.py). OpenVINO's differs in the 7th digit; on an NPU, ATC's default
#: force_fp16 may normalise in fp16, and CUDA has not been measured.
EXACT_UINT8_ON_CPU = ("onnxruntime", "torch")


def settle_uint8_input(cfg: RunConfig, backend: str, devices: list[Device]) -> RunConfig:
    """``uint8_input: auto`` made true or false for this run's backend and devices.

    Auto is on where the host's own cores run the network and the in-graph
    normalisation is the host's bit for bit: ONNX Runtime and PyTorch on CPU devices.
    There the host's normalisation and float mirror take cores from the network
    (every other thread costs ONNX Runtime about twice its CPU time on a busy host),
    while inside the graph they cost it nothing measurable: the backend alone 1.001 of
    the float model's speed, end to end +1.9% (2 cores, bs 16; docs/throughput.md).
    """
    if cfg.uint8_input is not None:
        return cfg
    on = backend in EXACT_UINT8_ON_CPU and all(d.kind == "cpu" for d in devices)
    return replace(cfg, uint8_input=on)


def variant_of(cfg: RunConfig) -> Variant:
    """The model variant of a config whose ``uint8_input`` is settled (``settle_uint8_input``)."""
    if cfg.uint8_input is None:
        raise ValueError("uint8_input auto is settled per run: call settle_uint8_input first")
    return Variant(fused_flip=cfg.fused_flip, uint8_input=cfg.uint8_input)


def prepare_model(cfg: RunConfig, backend: str, weights: str, box_set: BoxSet, bs: int,
                  devices: list[Device]) -> str:
    """The file the backend opens, converted and cached on first use ('' for sim: none)."""
    variant = variant_of(cfg)
    if backend == "sim":
        return ""
    if backend == "torch":
        return str(Path(weights).resolve())
    if backend in ("onnxruntime", "openvino"):
        options = ExportOptions(batch_size=None, variant=variant)
        return str(export_onnx(weights, cfg.models_dir, options, check_crops(box_set)).resolve())
    if backend == "om":
        from tasks.atc import convert_to_om

        onnx = export_onnx(weights, cfg.models_dir, ExportOptions(batch_size=bs, variant=variant),
                           check_crops(box_set))
        # The uint8 variant takes NHWC crops: ND tells ATC not to read its dims as NCHW.
        layout = {"input_chw": variant.input_shape(bs)[1:], "input_format": "ND"} if variant.uint8_input else {}
        return str(convert_to_om(onnx, cfg.models_dir, soc_version(devices), batch_size=bs, **layout).resolve())
    raise RunError(f"unknown backend {backend!r}")


def soc_version(devices: list[Device]) -> str:
    """The one chip type ATC builds an OM for."""
    socs = {d.soc for d in devices}
    if None in socs:
        raise RunError("cannot tell the NPUs' soc_version for ATC (npu-smi, or Ray on a cluster, does not name "
                       "the chip): pass --soc-version, e.g. --soc-version Ascend310P3")
    if len(socs) != 1:
        raise RunError(f"the devices of one run are of {len(socs)} chip types ({', '.join(sorted(socs))}); "
                       "an OM is built for one: name devices of one type in --devices")
    return socs.pop()


def shard_boxes(boxes: int, bs: int, shard_size: int, workers: int) -> int:
    """Boxes per shard: ``shard_size`` rounded up to whole batches, smaller when that gives
    every worker at least two shards; always whole batches, so batch boundaries depend
    on ``bs`` alone and every device count computes the same numbers."""
    configured = max(1, math.ceil(shard_size / bs))
    two_each = math.ceil(boxes / bs) // (2 * max(1, workers))
    return bs * max(1, min(configured, two_each))


def make_shards(box_set: BoxSet, per: int) -> list[Shard]:
    """Shards of ``per`` consecutive boxes (a multiple of the batch size)."""
    boxes = box_set.boxes
    shards = []
    for k, start in enumerate(range(0, len(boxes), per)):
        part = boxes[start:start + per]
        shards.append(Shard(k, part, {i: box_set.image_paths[i] for i in {b.image_id for b in part}}))
    return shards


def fingerprint(cfg: RunConfig, box_set: BoxSet, weights: str, backend: str, bs: int, model_path: str,
                devices: list[Device], per_shard: int) -> dict:
    """What decides the journalled numbers: a resume with any of it changed is refused."""
    import runner

    source = box_set.source if box_set.source == "gt" else file_sha256(box_set.source)
    model = Path(model_path) if model_path else None
    own_file = model is not None and model.is_file() and model.resolve() != Path(weights).resolve()
    return {"boxes": len(box_set.boxes), "box_source_sha256": source, "ann_sha256": file_sha256(box_set.ann_file),
            "weights_sha256": file_sha256(weights), "backend": backend, "bs": bs, "shard_size": cfg.shard_size,
            "shard_boxes": per_shard, "flip": cfg.flip, "fused_flip": cfg.fused_flip,
            "uint8_input": cfg.uint8_input, "model_file": model.name if model else "",
            "model_sha256": file_sha256(str(model)) if own_file else "",
            "soc_version": soc_version(devices) if backend == "om" else None,
            "device_kinds": sorted({d.kind for d in devices}), "runner_version": runner.__version__}


# ---------------------------------------------------------------- OUT


def prepare_out(cfg: RunConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise RunError(f"{out}: exists and is not empty; pass --resume to continue that run, "
                       "--overwrite to replace it, or another --out")
    if out.exists() and cfg.overwrite and not cfg.resume:
        for name in ("keypoints.json", "metrics.json", "throughput.json", "run.json", "devices.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "journal", ignore_errors=True)
        shutil.rmtree(out / "heatmaps", ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunError(f"{out}: cannot write results there ({e.strerror}); choose another --out") from None
    return out


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def versions() -> dict:
    """Versions of what decides the numbers and the speed; absent packages are left out."""
    import importlib.metadata as md

    import runner

    found = {"python": sys.version.split()[0], "runner": runner.__version__}
    for name in ("torch", "onnxruntime", "onnx", "ray", "opencv-python-headless", "opencv-python", "numpy",
                 "pycocotools", "ais_bench", "aclruntime"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    try:
        import cv2

        found["opencv"] = cv2.__version__
    except ImportError:
        pass
    cann = cann_version()
    if cann:
        found["cann"] = cann
    return found


def cann_version() -> str | None:
    """CANN's toolkit version from ASCEND_TOOLKIT_HOME's version files, when CANN is set up."""
    home = os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")
    for name in ("version.cfg", "compiler/version.info", "runtime/version.info"):
        try:
            text = (Path(home) / name).read_text() if home else ""
        except OSError:
            continue
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip().lower() == "version":
                return value.strip()
    return None


def format_metrics(metrics: dict) -> str:
    if not metrics.get("evaluated"):
        return f"accuracy: {metrics['accuracy']}"
    top = "  ".join(f"{n}={metrics[n]:.4f}" for n in STAT_NAMES[:5])
    bottom = "  ".join(f"{n}={metrics[n]:.4f}" for n in STAT_NAMES[5:])
    note = "" if metrics["complete"] else f"   INCOMPLETE: {metrics['skipped']} boxes skipped"
    return f"COCO keypoint mAP {metrics['AP']:.4f}{note}\n{top}\n{bottom}"


# ---------------------------------------------------------------- the run


@dataclass
class Inputs:
    """What every run of a command shares: the boxes, the checkpoint, whether mAP means anything."""

    box_set: BoxSet
    weights: str
    evaluated: bool


def load_inputs(cfg: RunConfig) -> Inputs:
    box_set, weights, evaluated = resolve_inputs(cfg)
    check_images(box_set, cfg.skip_missing_images)
    if evaluated:  # before Ray starts: a wrong, truncated or unsafe file is named at once
        check_checkpoint(weights)
    if not box_set.boxes:
        raise RunError(f"{box_set.source}: no usable boxes ({len(box_set.skipped)} skipped)")
    return Inputs(box_set, weights, evaluated)


#: The files of one finished run; a sweep's --resume keeps a batch size that has them all.
RUN_FILES = ("keypoints.json", "metrics.json", "throughput.json", "run.json")


def load_outcome(out: Path) -> RunOutcome:
    tp = json.loads((out / "throughput.json").read_text())
    return RunOutcome(out, json.loads((out / "metrics.json").read_text()), tp, tp.get("lost_devices", []))


def session_for(cfg: RunConfig):
    """The Ray session of a command: a private Ray for ``--devices``, or ``--address``'s cluster."""
    return ray_session(cfg.devices, cfg.address, cfg.soc_version)


def dispatch_policy(cfg: RunConfig) -> DispatchPolicy:
    return DispatchPolicy(straggler_factor=cfg.straggler_factor, straggler_floor_s=cfg.straggler_floor,
                          device_timeout_s=cfg.device_timeout)


def run(cfg: RunConfig, log=print) -> RunOutcome:
    """One run at one batch size; several batch sizes go to ``runner.sweep.run_sweep``."""
    if len(cfg.bs) != 1:
        raise RunError("several batch sizes: use the sweep (runner.sweep.run_sweep)")
    from runner.detect import plan_detection, run_planned_detection

    log = (lambda *a, **k: None) if cfg.quiet else log
    out = prepare_out(cfg)
    plan = plan_detection(cfg, log)  # --dets FILE not there yet and --detector-weights: detect first
    inputs = None if plan else load_inputs(cfg)
    with session_for(cfg) as session:
        backend = choose_backend(cfg.backend, session.devices)
        cfg = settle_uint8_input(cfg, backend, session.devices)
        if plan:
            run_planned_detection(plan, session, cfg, backend, log)
            inputs = load_inputs(cfg)
        with actor_pool(session, Worker, backend, cfg.threads) as pool:
            outcome = run_batch(cfg, session, pool, inputs, backend, cfg.bs[0], out, log)
    log(format_throughput(outcome.throughput))
    log(format_metrics(outcome.metrics))
    return outcome


def ready_workers(cfg: RunConfig, session: Session, pool: ActorPool, backend: str, model_path: str, bs: int,
                  out: Path, log) -> list[dict]:
    """The pose workers at batch size ``bs``: started on first use, switched in a sweep's later runs.

    A worker that cannot switch (it died between two batch sizes) is dropped with one
    line and the run goes on with the others. ``OUT/devices.json`` says who runs where.
    """
    dump_dir = str((out / "heatmaps").resolve()) if cfg.dump_heatmaps else None
    if not pool.started:
        def worker_config(p: Placement) -> WorkerConfig:
            return WorkerConfig(backend, model_path, p.in_process, p.label, p.device.kind, bs, p.threads,
                                prep_threads(cfg.prep_threads, p.in_process, backend, session.cpus_per_worker),
                                cfg.flip, dump_dir, variant_of(cfg), cfg.sim_rate)

        described = pool.start(worker_config)
        log("workers: " + ", ".join(f"{d['device']} pid {d['pid']} on {d['node']}" for d in described))
    else:
        for label, why in pool.call_all("set_batch", model_path, bs, dump_dir).items():
            log(f"device {label} lost (it could not switch to bs {bs}: {why}); the others go on")
        if not pool.actors:
            raise RunError(f"every device was lost ({'; '.join(f'{k}: {v}' for k, v in pool.lost.items())}); "
                           "rerun the same command with --resume to continue from the batch sizes done")
    described = pool.current()
    write_json(out / "devices.json", described)
    return described


@contextmanager
def ctrl_c_stops(stop: threading.Event) -> Iterator[None]:
    """The first Ctrl-C sets ``stop``, so the dispatch ends between two Ray calls, never
    inside one or inside a journal write; a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # a run in a thread (tests): signals go to the main thread's own handler
        return

    def handler(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_batch(cfg: RunConfig, session: Session, pool: ActorPool, inputs: Inputs, backend: str, bs: int,
              out: Path, log, keep_finished: bool = False) -> RunOutcome:
    """One full pass over the boxes at batch size ``bs`` into ``out``: the body of a run.

    ``keep_finished``: with --resume, a run whose shards and files are all there is
    read back instead of being written again (a sweep's finished batch sizes).
    """
    box_set, weights, evaluated = inputs.box_set, inputs.weights, inputs.evaluated
    devices = session.devices
    model_path = prepare_model(cfg, backend, weights, box_set, bs, devices)
    previous = Journal.previous_fingerprint(out / "journal") if cfg.resume else None
    # A resumed run keeps its shards, whatever the device count now.
    per_shard = (previous or {}).get("shard_boxes") or shard_boxes(len(box_set.boxes), bs, cfg.shard_size,
                                                                   len(devices))
    journal = Journal(out / "journal", fingerprint(cfg, box_set, weights, backend, bs, model_path, devices,
                                                   per_shard))
    done = journal.start(cfg.resume)
    shards = make_shards(box_set, per_shard)
    # A shard with skipped boxes runs again: the file may be readable now (a transient error, a fix).
    todo = deque(s for s in shards if s.id not in done or done[s.id].skipped)
    done = {k: r for k, r in done.items() if not r.skipped}
    if keep_finished and cfg.resume and not todo and all((out / n).exists() for n in RUN_FILES):
        log(f"bs {bs}: finished before, kept ({out})")
        return load_outcome(out)
    started = time.time()
    log(f"{len(box_set.boxes)} boxes in {len(shards)} shards of {per_shard} ({len(done)} done before) on "
        f"{', '.join(str(d) for d in devices)}{' (Ray cluster)' if session.existing else ''}; "
        f"backend {backend}, bs {bs}")
    if "npu" in {d.kind for d in devices} and compute_device("npu", backend) == "cpu":
        log(f"note: backend {backend} computes on the CPU; the NPU slots only place the workers")
    fresh: list[ShardResult] = []
    failed: list[tuple[int, str]] = []  # (box id, why) of shards given up
    described: list[dict] = []
    report = DispatchReport()
    first_dispatch = last_result = time.time()
    if todo:
        described = ready_workers(cfg, session, pool, backend, model_path, bs, out, log)
        done_boxes = sum(len(r.box_ids) for r in done.values())
        progress = Progress(len(box_set.boxes), done_boxes, [d["device"] for d in described], len(shards),
                            quiet=cfg.quiet, log=log, title=f"bs {bs} ")

        def on_result(r: ShardResult) -> None:
            nonlocal last_result
            try:
                journal.add(r)
            except OSError as e:
                raise RunError(f"{journal.dir}: cannot save a finished shard ({e.strerror or e}); the "
                               f"{len(done) + len(fresh)} shards saved before are kept: free the disk, then rerun "
                               "the same command with --resume") from None
            fresh.append(r)
            last_result = time.time()
            progress.update(r)

        def on_failed(shard: Shard, why: str) -> None:
            failed.extend((b.id, f"its shard failed on every try: {why}") for b in shard.boxes)

        first_dispatch = time.time()
        stop = threading.Event()
        try:
            with ctrl_c_stops(stop):
                report = dispatch(pool, todo, on_result, log, dispatch_policy(cfg), on_failed, stop)
        except (Stopped, KeyboardInterrupt):
            raise Interrupted(f"interrupted: {len(done) + len(fresh)} of {len(shards)} shards are saved "
                              f"in {out / 'journal'}; rerun the same command with --resume") from None
        except AllDevicesLost as e:
            raise RunError(f"{e}; finished shards are kept: rerun the same command with --resume") from None
        finally:
            progress.close()
    for d in described:
        d["lost"] = d["device"] in report.lost
        if d["lost"]:
            d["lost_reason"] = report.lost[d["device"]]
    if described:
        write_json(out / "devices.json", described)

    merged = merge_shards(list(done.values()) + fresh)
    records = pose_records(box_set.boxes, merged.box_ids, merged.keypoints, merged.crop_boxes)
    final = rescore_and_nms(records)
    write_json(out / "keypoints.json", final)

    skipped = [{"box_index": s.box_index, "image_id": s.image_id, "reason": s.reason} for s in box_set.skipped]
    by_id = {b.id: b for b in box_set.boxes}
    skipped += [{"box_index": i, "image_id": by_id[i].image_id, "reason": reason}
                for i, reason in sorted(merged.skipped + failed)]
    metrics = {"evaluated": evaluated and backend != "sim"}
    if metrics["evaluated"]:
        metrics.update(evaluate_keypoints(box_set.ann_file, final))
    else:
        metrics["accuracy"] = "n/a (simulated device)" if backend == "sim" else "n/a (no checkpoint)"
    metrics.update({"boxes": len(box_set.boxes) + len(box_set.skipped), "results_before_nms": len(records),
                    "results": len(final), "skipped": len(skipped), "complete": not skipped,
                    "skipped_boxes": skipped, "ann_file": box_set.ann_file, "box_source": box_set.source})
    write_json(out / "metrics.json", metrics)

    if fresh or not (out / "throughput.json").exists():
        tp = run_throughput(fresh, done, described, report, first_dispatch, last_result, out)
        write_json(out / "throughput.json", tp)
        finished = time.time()
        write_json(out / "run.json", {
            "config": asdict(cfg), "bs": bs, "backend": backend, "model_path": model_path,
            "model": {"name": "FastPose ResNet-50 256x192", "file": Path(model_path).name},
            "devices": described,
            "device_specs": [{"kind": d.kind, "id": d.id, "name": d.name, "soc": d.soc} for d in devices],
            "versions": versions(), "weights": weights, "weights_sha256": journal.fingerprint["weights_sha256"],
            "box_source": box_set.source, "box_source_sha256": journal.fingerprint["box_source_sha256"],
            "boxes": len(box_set.boxes), "skipped_boxes": len(box_set.skipped),
            "started": started, "finished": finished, "started_iso": _iso(started), "finished_iso": _iso(finished),
            "timing_scope": dict(tp["labels"], **TIMING_SCOPE)})
    else:  # a resume with nothing left to run: the figures of the run that computed it stay
        tp = json.loads((out / "throughput.json").read_text())
    return RunOutcome(out, metrics, tp, list(tp.get("lost_devices", [])))


def run_throughput(fresh: list[ShardResult], done: dict[int, ShardResult], described: list[dict],
                   report: DispatchReport, first_dispatch: float, last_result: float, out: Path) -> dict:
    """throughput.json: this run's shards; when it computed none, rebuilt from the journal."""
    if not fresh and done:
        results = list(done.values())
        known = {d["device"]: d for d in (json.loads((out / "devices.json").read_text())
                                          if (out / "devices.json").exists() else [])}
        rows = [known.get(label, {"device": label, "kind": label.split(":")[0]})
                for label in dict.fromkeys(r.device for r in results)]
        tp = throughput(results, rows, min(r.started for r in results), max(r.finished for r in results))
        tp["totals"]["rebuilt_from_journal"] = True
        tp["totals"]["resumed_boxes"] = 0
    else:
        tp = throughput(fresh, described, first_dispatch, last_result)
        tp["totals"]["resumed_boxes"] = int(sum(len(r.box_ids) for r in done.values()))
    for row in tp["devices"]:
        row["copies_won"] = int(report.copies_won.get(row["id"], 0))
        if row["id"] in report.lost:
            row["lost_reason"] = report.lost[row["id"]]
    tp["totals"]["speculative_copies"] = report.copies
    tp["totals"]["speculative_copies_won"] = int(sum(report.copies_won.values()))
    tp["totals"]["failed_shards"] = len(report.failed)
    tp["lost_devices"] = list(report.lost)
    return tp


#: Where each time figure starts and stops; written into run.json next to the per-figure labels.
TIMING_SCOPE = {
    "started/finished": "run.json only: from the journal's start (after the model is converted or found in "
                        "the cache) to the last file written, evaluation included",
    "e2e window": "first shard dispatched to last shard result: excludes Ray start, worker start, model "
                  "conversion, merge, OKS-NMS and COCOeval",
    "device_seconds scope": "per backend call, timed inside the actor around the backend's run()",
}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
