"""``run(cfg)``: boxes -> shards -> one Ray actor per device -> merge -> OKS-NMS -> COCOeval -> OUT.

The driver keeps a small queue of shards and about two in flight per actor, so
faster devices take more. When an actor dies its shards go back to the queue.
Everything the run writes to OUT is written atomically.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cluster.actor import Shard, ShardResult, Worker, WorkerConfig
from cluster.devices import Device, parse_devices
from cluster.reducer import format_throughput, merge_shards, throughput
from runner.config import RunConfig
from runner.journal import Journal, atomic_write_text
from tasks.dataset import BoxSet, DataError, load_boxes, missing_images, read_rgb
from tasks.evaluation import STAT_NAMES, evaluate_keypoints, pose_records, rescore_and_nms
from tasks.export import ExportOptions, export_onnx
from tasks.model import build_fastpose, file_sha256
from tasks.pipeline import prepare_batch
from tasks.transforms import crops_to_input

IN_FLIGHT_PER_ACTOR = 2
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
        missing.append("a box source (--dets FILE or --boxes gt)")
    if missing:
        raise RunError(f"missing {'; '.join(missing)}. Get {COCO_HELP} and {CHECKPOINT_HELP}; "
                       "or try the pipeline without them: python -m runner --synthetic 256")
    if cfg.dets and cfg.boxes == "gt":
        raise RunError("give either --dets FILE or --boxes gt, not both")
    if cfg.boxes not in (None, "gt"):
        raise RunError(f"--boxes {cfg.boxes!r}: the only box source besides --dets is 'gt'")
    return load_boxes(cfg.dataroot, cfg.dets, cfg.ann), cfg.weights, True


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
    """Real network inputs for verifying an export: the first few boxes' crops."""
    boxes = box_set.boxes[:n]
    images = {i: read_rgb(box_set.image_paths[i]) for i in {b.image_id for b in boxes}}
    return crops_to_input(prepare_batch(boxes, images).crops)


def prepare_model(cfg: RunConfig, backend: str, weights: str, box_set: BoxSet, bs: int,
                  devices: list[Device]) -> str:
    """The file the backend opens, converted and cached on first use."""
    if backend == "torch":
        return str(Path(weights).resolve())
    if backend == "onnxruntime":
        return str(export_onnx(weights, cfg.models_dir, ExportOptions(batch_size=None), check_crops(box_set)).resolve())
    if backend == "om":
        from tasks.atc import convert_to_om

        onnx = export_onnx(weights, cfg.models_dir, ExportOptions(batch_size=bs), check_crops(box_set))
        socs = {d.soc for d in devices}
        if len(socs) != 1 or None in socs:
            raise RunError(f"cannot tell the NPU's soc_version for ATC from npu-smi ({socs}); "
                           "all devices of a run must be one chip type")
        return str(convert_to_om(onnx, cfg.models_dir, socs.pop(), batch_size=bs).resolve())
    raise RunError(f"unknown backend {backend!r}")


def make_shards(box_set: BoxSet, bs: int, shard_size: int) -> list[Shard]:
    """Shards of whole batches: batch boundaries depend on bs alone, so every device
    count computes the same batches and the same numbers."""
    per = bs * max(1, math.ceil(shard_size / bs))
    boxes = box_set.boxes
    shards = []
    for k, start in enumerate(range(0, len(boxes), per)):
        part = boxes[start:start + per]
        shards.append(Shard(k, part, {i: box_set.image_paths[i] for i in {b.image_id for b in part}}))
    return shards


def fingerprint(cfg: RunConfig, box_set: BoxSet, weights: str, backend: str, bs: int) -> dict:
    source = box_set.source if box_set.source == "gt" else file_sha256(box_set.source)
    return {"boxes": len(box_set.boxes), "box_source_sha256": source, "weights_sha256": file_sha256(weights),
            "backend": backend, "bs": bs, "shard_size": cfg.shard_size, "flip": cfg.flip}


# ---------------------------------------------------------------- Ray


@dataclass
class Placement:
    device: Device
    options: dict  # ray actor options
    in_process: str  # the device as the actor's process sees it
    label: str
    threads: int


def placements(devices: list[Device], threads: int, prep_threads: int) -> list[Placement]:
    cores = os.cpu_count() or 1
    out = []
    for d in devices:
        if d.kind == "cpu":
            share = max(1, cores // len(devices))
            # Fractional CPUs let N workers share the host; threads are set from the share
            # because Ray forces OMP_NUM_THREADS=1 and ONNX Runtime ignores it anyway.
            out.append(Placement(d, {"num_cpus": cores / len(devices)}, "cpu", f"cpu:{d.id}",
                                 threads or share))
        elif d.kind == "cuda":
            out.append(Placement(d, {"num_gpus": 1, "num_cpus": 0}, "cuda:0", f"cuda:{d.id}", threads or 1))
        else:
            # Ray sets ASCEND_RT_VISIBLE_DEVICES for an {"NPU": 1} actor: its device is 0 inside.
            out.append(Placement(d, {"resources": {"NPU": 1}, "num_cpus": 0}, "npu:0", f"npu:{d.id}",
                                 threads or 1))
    return out


@contextmanager
def ray_session(cfg: RunConfig, devices: list[Device]):
    import ray

    if ray.is_initialized():  # a caller (a test, a sweep) owns the cluster
        yield ray
        return
    env = {}
    kinds = {d.kind for d in devices}
    if cfg.address:
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    else:
        resources = {}
        if "npu" in kinds:
            ids = [d.logical_id if d.logical_id is not None else d.id for d in devices]
            env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(str(i) for i in sorted(ids))
            resources["NPU"] = len(ids)
        if "cuda" in kinds:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d.id) for d in devices)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            ray.init(num_cpus=os.cpu_count(), num_gpus=len(devices) if "cuda" in kinds else 0,
                     resources=resources, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR", configure_logging=True)
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    try:
        yield ray
    finally:
        ray.shutdown()


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "cause", None) or error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Ray wraps the actor's exception; its last line is the one the user needs.
    return lines[-1] if lines else type(error).__name__


def dispatch(ray, actors: dict[str, object], shards: deque[Shard], on_result, log) -> list[str]:
    """Feed shards to actors until all are done; returns the labels of lost actors."""
    from ray.exceptions import RayActorError, RayTaskError

    alive = dict(actors)
    inflight: dict[object, tuple[Shard, str]] = {}
    per_actor = {label: 0 for label in alive}
    lost: list[str] = []
    causes: list[str] = []

    def fill() -> None:
        for label in list(alive):
            while shards and per_actor[label] < IN_FLIGHT_PER_ACTOR:
                shard = shards.popleft()
                inflight[alive[label].run_shard.remote(shard)] = (shard, label)
                per_actor[label] += 1

    fill()
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1)
        ref = ready[0]
        shard, label = inflight.pop(ref)
        per_actor[label] -= 1
        try:
            result = ray.get(ref)
        except (RayActorError, RayTaskError) as e:
            shards.appendleft(shard)
            if label in alive:
                cause = _first_line(e)
                causes.append(f"{label}: {cause}")
                log(f"device {label} lost ({cause}); its shards go to the other devices")
                if isinstance(e, RayTaskError):
                    ray.kill(alive[label], no_restart=True)
                del alive[label]
                lost.append(label)
            if not alive:
                raise RunError(f"every device was lost ({'; '.join(causes)}); finished shards are kept: "
                               "rerun the same command with --resume")
        else:
            on_result(result)
        fill()
    return lost


# ---------------------------------------------------------------- OUT


def prepare_out(cfg: RunConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise RunError(f"{out}: exists and is not empty; pass --resume to continue that run, "
                       "--overwrite to replace it, or another --out")
    if out.exists() and cfg.overwrite and not cfg.resume:
        for name in ("keypoints.json", "metrics.json", "throughput.json", "run.json"):
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
    import importlib.metadata as md

    found = {"python": sys.version.split()[0]}
    for name in ("runner", "torch", "onnxruntime", "onnx", "ray", "opencv-python-headless", "numpy",
                 "pycocotools", "ais_bench", "aclruntime"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def format_metrics(metrics: dict) -> str:
    if not metrics.get("evaluated"):
        return f"accuracy: {metrics['accuracy']}"
    top = "  ".join(f"{n}={metrics[n]:.4f}" for n in STAT_NAMES[:5])
    bottom = "  ".join(f"{n}={metrics[n]:.4f}" for n in STAT_NAMES[5:])
    note = "" if metrics["complete"] else f"   INCOMPLETE: {metrics['skipped']} boxes skipped"
    return f"COCO keypoint mAP {metrics['AP']:.4f}{note}\n{top}\n{bottom}"


# ---------------------------------------------------------------- the run


def run(cfg: RunConfig, log=print) -> RunOutcome:
    if len(cfg.bs) != 1:
        raise RunError("several batch sizes: use the sweep (runner.sweep.run_sweep)")
    bs = cfg.bs[0]
    log = (lambda *a, **k: None) if cfg.quiet else log
    out = prepare_out(cfg)
    box_set, weights, evaluated = resolve_inputs(cfg)
    check_images(box_set, cfg.skip_missing_images)
    if not box_set.boxes:
        raise RunError(f"{box_set.source}: no usable boxes ({len(box_set.skipped)} skipped)")
    devices = parse_devices(cfg.devices)
    backend = choose_backend(cfg.backend, devices)
    model_path = prepare_model(cfg, backend, weights, box_set, bs, devices)
    journal = Journal(out / "journal", fingerprint(cfg, box_set, weights, backend, bs))
    done = journal.start(cfg.resume)
    shards = make_shards(box_set, bs, cfg.shard_size)
    todo = deque(s for s in shards if s.id not in done)
    started = time.time()
    log(f"{len(box_set.boxes)} boxes in {len(shards)} shards ({len(done)} done before) on "
        f"{', '.join(str(d) for d in devices)}; backend {backend}, bs {bs}")

    fresh: list[ShardResult] = []
    described: list[dict] = []
    lost: list[str] = []
    first_dispatch = last_result = time.time()
    if todo:
        with ray_session(cfg, devices) as ray:
            actors = {}
            for p in placements(devices, cfg.threads, cfg.prep_threads):
                wc = WorkerConfig(backend, model_path, p.in_process, p.label, p.device.kind, bs, p.threads,
                                  cfg.prep_threads, cfg.flip,
                                  str((out / "heatmaps").resolve()) if cfg.dump_heatmaps else None)
                actors[p.label] = ray.remote(max_concurrency=IN_FLIGHT_PER_ACTOR, max_restarts=0,
                                             **p.options)(Worker).remote(wc)
            try:
                described = ray.get([a.describe.remote() for a in actors.values()])
            except Exception as e:
                raise RunError(f"a device worker failed to start: {_first_line(e)}") from None

            def on_result(r: ShardResult) -> None:
                nonlocal last_result
                journal.add(r)
                fresh.append(r)
                last_result = time.time()
                log(f"  shard {r.shard_id + 1}/{len(shards)} from {r.device}: {len(r.box_ids)} boxes")

            first_dispatch = time.time()
            try:
                lost = dispatch(ray, actors, todo, on_result, log)
            except KeyboardInterrupt:
                raise Interrupted(f"interrupted: {len(done) + len(fresh)} of {len(shards)} shards are saved "
                                  f"in {out / 'journal'}; rerun the same command with --resume") from None
            finally:
                for a in actors.values():
                    try:
                        ray.kill(a)
                    except Exception:
                        pass
    for d in described:
        d["lost"] = d["device"] in lost

    merged = merge_shards(list(done.values()) + fresh)
    records = pose_records(box_set.boxes, merged.box_ids, merged.keypoints, merged.crop_boxes)
    final = rescore_and_nms(records)
    write_json(out / "keypoints.json", final)

    skipped = [{"box_index": s.box_index, "image_id": s.image_id, "reason": s.reason} for s in box_set.skipped]
    by_id = {b.id: b for b in box_set.boxes}
    skipped += [{"box_index": i, "image_id": by_id[i].image_id, "reason": reason} for i, reason in merged.skipped]
    metrics = {"evaluated": evaluated}
    if evaluated:
        metrics.update(evaluate_keypoints(box_set.ann_file, final))
    else:
        metrics["accuracy"] = "n/a (no checkpoint)"
    metrics.update({"boxes": len(box_set.boxes) + len(box_set.skipped), "results_before_nms": len(records),
                    "results": len(final), "skipped": len(skipped), "complete": not skipped,
                    "skipped_boxes": skipped, "ann_file": box_set.ann_file, "box_source": box_set.source})
    write_json(out / "metrics.json", metrics)

    tp = throughput(fresh, described, first_dispatch, last_result)
    tp["totals"]["resumed_boxes"] = int(sum(len(r.box_ids) for r in done.values()))
    tp["lost_devices"] = lost
    write_json(out / "throughput.json", tp)
    write_json(out / "run.json", {
        "config": asdict(cfg), "backend": backend, "model_path": model_path, "devices": described,
        "versions": versions(), "weights_sha256": journal.fingerprint["weights_sha256"],
        "box_source_sha256": journal.fingerprint["box_source_sha256"], "boxes": len(box_set.boxes),
        "started": started, "finished": time.time(), "timing_scope": tp["labels"]})
    log(format_throughput(tp))
    log(format_metrics(metrics))
    return RunOutcome(out, metrics, tp, lost)
