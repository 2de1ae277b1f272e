"""``run(cfg)``: boxes -> shards -> one Ray actor per device -> merge -> OKS-NMS -> COCOeval -> OUT.

The driver keeps a small queue of shards and about two in flight per actor, so
faster devices take more. When an actor dies its shards go back to the queue.
``--devices`` names this host's devices for a private Ray; on an existing cluster
(``--address``, or a Ray the caller started) it counts the cluster's resources.
Everything the run writes to OUT is written atomically.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from cluster.actor import Shard, ShardResult, Worker, WorkerConfig
from cluster.devices import Device, DeviceError, parse_devices
from cluster.reducer import format_throughput, merge_shards, throughput
from runner.config import RunConfig
from runner.journal import Journal, atomic_write_text
from runner.progress import Progress
from tasks.dataset import BoxSet, DataError, load_boxes, missing_images, read_rgb
from tasks.evaluation import STAT_NAMES, evaluate_keypoints, pose_records, rescore_and_nms
from tasks.deploy import Variant
from tasks.export import ExportOptions, export_onnx
from tasks.model import build_fastpose, check_checkpoint, file_sha256
from tasks.pipeline import prepare_batch

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


def with_soc(devices: list[Device], soc: str | None) -> list[Device]:
    """The NPUs with ``--soc-version`` as their ATC soc_version, when given: it wins over
    what discovery read, for boards whose npu-smi text does not name the chip (A3) and
    clusters whose Ray does not."""
    if soc is None:
        return devices
    return [replace(d, soc=soc) if d.kind == "npu" else d for d in devices]


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
            "backend": backend, "bs": bs, "shard_size": cfg.shard_size, "flip": cfg.flip,
            "fused_flip": cfg.fused_flip, "uint8_input": cfg.uint8_input}


# ---------------------------------------------------------------- Ray


@dataclass
class Session:
    """A Ray cluster to run on and the devices ``--devices`` names in it."""

    ray: object
    devices: list[Device]
    cpus_per_worker: float  # the CPU share of one worker: Ray's num_cpus for CPU workers
    existing: bool  # a cluster someone else started: its devices are counted, not named


def cluster_devices(spec: str, resources: dict[str, float]) -> list[Device]:
    """Devices of an existing Ray cluster, counted from ``ray.cluster_resources()``.

    Ids name devices of this host; which chip of which node an actor gets is decided
    by Ray and each node's own visibility settings, so on a cluster only kinds and
    counts can be asked for: ``all`` (one worker per NPU), ``cuda`` (one per GPU),
    ``cpu`` or ``cpu:N``.
    """
    text = spec.strip()
    if text == "cpu" or text.startswith("cpu:"):
        return parse_devices(text)  # never runs discovery
    if text not in ("all", "cuda"):
        raise DeviceError(f"--devices {spec}: ids name this host's devices and cannot pick a Ray cluster's "
                          "remote ones; use all (one worker per NPU in the cluster), cuda (one per GPU) or cpu:N")
    kind, resource = ("npu", "NPU") if text == "all" else ("cuda", "GPU")
    count = int(resources.get(resource, 0))
    if count < 1:
        have = ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if k.isupper())
        raise DeviceError(f"--devices {spec}: the Ray cluster has no {resource} resource ({have}); start its nodes "
                          f"with ray start --resources='{{\"{resource}\": N}}', or where Ray detects them")
    # Ray adds accelerator_type:<soc> per node when pyACL names the chip; ATC needs it.
    types = {k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")}
    socs = {t for t in types if t.startswith("Ascend")} if kind == "npu" else set()
    soc = socs.pop() if len(socs) == 1 else None
    return [Device(kind, i, soc or resource, soc) for i in range(count)]


def _cluster_cpus_per_worker(ray, workers: int) -> float:
    """An equal share of the cluster's CPUs that still fits on its largest node."""
    largest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=1.0)
    return max(0.01, min(ray.cluster_resources().get("CPU", 1.0) / workers, largest))


def _start_local(ray, devices: list[Device]) -> None:
    """A private Ray on this host whose NPU/GPU slots are exactly the ``--devices`` named.

    Ray maps an actor's slot through the visibility variable of the process that
    started the node (spec ascend.md §4.4), so setting it to the chosen ids here makes
    each {"NPU": 1} actor see one of them.
    """
    env, resources = {}, {}
    kinds = {d.kind for d in devices}
    if "npu" in kinds:
        ids = [d.logical_id if d.logical_id is not None else d.id for d in devices]
        env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(str(i) for i in sorted(ids))
        resources["NPU"] = len(ids)
    if "cuda" in kinds:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d.id) for d in devices)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        # address="local": a new private Ray even when a `ray start` cluster runs on this host.
        ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=len(devices) if "cuda" in kinds else 0,
                 resources=resources, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", configure_logging=True)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


#: This project's packages, shipped to a cluster's nodes: their workers then import the
#: driver's code, whatever their working directory; nodes need only the same Python packages.
CODE = [str(Path(__file__).resolve().parents[1] / name) for name in ("runner", "cluster", "tasks")]


def _join(ray, address: str) -> None:
    from ray.exceptions import RayError  # AuthenticationError: no or another token

    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"py_modules": CODE})
    except (ConnectionError, RuntimeError, ValueError, RayError) as e:
        raise RunError(f"--address {address}: cannot join a Ray cluster ({_first_line(e)}); start one with "
                       "`ray start --head`, and with token authentication on, export RAY_AUTH_MODE=token and "
                       "its token (README: Many devices and hosts)") from None


@contextmanager
def ray_session(cfg: RunConfig) -> Iterator[Session]:
    """Start a private Ray for ``--devices`` on this host, or use an existing cluster.

    An existing cluster is one given by ``--address`` or a Ray the caller (a test, a
    sweep) already initialised; it is left running.
    """
    import ray

    owned = not ray.is_initialized()
    try:
        if owned and not cfg.address:
            devices = with_soc(parse_devices(cfg.devices), cfg.soc_version)  # before Ray starts
            _start_local(ray, devices)
            yield Session(ray, devices, (os.cpu_count() or 1) / len(devices), existing=False)
        else:
            if owned:
                _join(ray, cfg.address)
            devices = with_soc(cluster_devices(cfg.devices, ray.cluster_resources()), cfg.soc_version)
            yield Session(ray, devices, _cluster_cpus_per_worker(ray, len(devices)), existing=True)
    finally:
        if owned and ray.is_initialized():
            ray.shutdown()


def compute_device(kind: str, backend: str) -> str:
    """The device the backend opens inside an actor pinned to a ``kind`` slot.

    Ray makes the pinned accelerator device 0 of the actor's process. Only the OM
    backend runs on NPUs: torch and ONNX Runtime here have no NPU support, so on an
    NPU slot they compute on the CPU. That is deliberate and used on purpose: it runs
    Ray's real NPU scheduling and pinning (the slot, ASCEND_RT_VISIBLE_DEVICES) on
    hosts without NPUs, which is how the tests check them. The run says so in a line.
    """
    if kind == "npu":
        return "npu:0" if backend == "om" else "cpu"
    return "cuda:0" if kind == "cuda" else "cpu"


@dataclass
class Placement:
    device: Device
    options: dict  # ray actor options
    in_process: str  # the device the backend opens, as the actor's process sees it
    label: str  # provisional: NPU and GPU workers are named once placed (device_label)
    threads: int


def placements(devices: list[Device], backend: str, threads: int, cpus_per_worker: float) -> list[Placement]:
    out = []
    for d in devices:
        in_process = compute_device(d.kind, backend)
        # Ray forces OMP_NUM_THREADS=1 and ONNX Runtime ignores it anyway: threads are
        # set from the worker's share of cores whenever the backend computes on the CPU.
        share = threads or (max(1, int(cpus_per_worker)) if in_process == "cpu" else 1)
        if d.kind == "cpu":
            # Fractional CPUs let N workers share a host.
            options = {"num_cpus": cpus_per_worker}
        elif d.kind == "cuda":
            options = {"num_gpus": 1, "num_cpus": 0}
        else:
            # Ray sets ASCEND_RT_VISIBLE_DEVICES for an {"NPU": 1} actor: its device is 0 inside.
            options = {"resources": {"NPU": 1}, "num_cpus": 0}
        out.append(Placement(d, options, in_process, f"{d.kind}:{d.id}", share))
    return out


def prep_threads(configured: int, in_process: str, backend: str, cpus_per_worker: float) -> int:
    """Preprocessing threads of one worker: ``configured``, or sized to its share of the host.

    A backend computing on the CPU owns the worker's cores, so one thread is enough
    to prepare the next batch meanwhile. A device (or a simulated one) leaves them to
    preprocessing: one thread per core of the share, at most 8.
    """
    if configured:
        return configured
    if in_process == "cpu" and backend != "sim":
        return 1
    return max(1, min(8, int(cpus_per_worker)))


def device_label(described: dict, devices: list[Device], existing: bool) -> str:
    """The name a placed worker's device gets in logs, throughput.json and the journal.

    Ray, not the driver, picks which of the slots an actor gets, so NPU and GPU
    workers are named from the id Ray assigned them. On this host's private Ray that
    id is the logical id the driver put in the visibility variable: named back as the
    user wrote it in ``--devices``.
    """
    kind = described["kind"]
    if kind == "cpu":
        return described["device"]
    ids = described["accelerator_ids"].get("NPU" if kind == "npu" else "GPU") or [described["visible_devices"]]
    assigned = str(ids[0])
    if not existing:
        for d in devices:
            own = d.logical_id if d.kind == "npu" and d.logical_id is not None else d.id
            if str(own) == assigned:
                return f"{kind}:{d.id}"
    return f"{kind}:{assigned}"


def name_devices(described: list[dict], devices: list[Device], existing: bool) -> list[str]:
    """Unique labels: ids repeat across nodes of a cluster, so those get their node too."""
    labels = [device_label(d, devices, existing) for d in described]
    repeated = {x for x in labels if labels.count(x) > 1}
    return [f"{x}@{d['node']}" if x in repeated else x for x, d in zip(labels, described)]


def start_workers(session: Session, cfg: RunConfig, backend: str, model_path: str, bs: int,
                  out: Path) -> tuple[dict[str, object], list[dict]]:
    """One named actor per device, described and named; ``OUT/devices.json`` says who runs where.

    The file is written as soon as the workers are up, so a user (or a test) can see
    which process on which node holds which device while the run goes on.
    """
    def worker_config(p: Placement) -> WorkerConfig:
        return WorkerConfig(backend, model_path, p.in_process, p.label, p.device.kind, bs, p.threads,
                            prep_threads(cfg.prep_threads, p.in_process, backend, session.cpus_per_worker),
                            cfg.flip, str((out / "heatmaps").resolve()) if cfg.dump_heatmaps else None,
                            variant_of(cfg), cfg.sim_rate)

    actors, described = launch_actors(session, Worker, worker_config, backend, cfg.threads)
    write_json(out / "devices.json", described)
    return actors, described


def launch_actors(session: Session, actor_class: type, make_config, backend: str, threads: int,
                  max_concurrency: int = IN_FLIGHT_PER_ACTOR) -> tuple[dict[str, object], list[dict]]:
    """One named actor of ``actor_class`` per device, pinned by ``placements``, described and named.

    ``make_config(placement)`` is the actor's one constructor argument; the class has a
    ``describe()`` as ``cluster.actor.Worker``'s. Used by the pose workers and the
    detector's (``runner.detect``). When one fails to start, all are killed (RunError).
    """
    ray = session.ray
    run_tag = uuid.uuid4().hex[:8]  # actor names are cluster-wide; runs must not collide
    handles, names = [], []
    for k, p in enumerate(placements(session.devices, backend, threads, session.cpus_per_worker)):
        names.append(f"runner-{run_tag}-{k}")
        handles.append(ray.remote(max_concurrency=max_concurrency, max_restarts=0, **p.options)(actor_class)
                       .options(name=names[-1]).remote(make_config(p)))
    try:
        described = ray.get([h.describe.remote() for h in handles])
    except Exception as e:
        for h in handles:
            ray.kill(h)
        raise RunError(f"a device worker failed to start: {_first_line(e)}") from None
    labels = name_devices(described, session.devices, session.existing)
    for d, label, name in zip(described, labels, names):
        d.update(device=label, actor=name)
    return dict(zip(labels, handles)), described


def _first_line(error: BaseException) -> str:
    from ray.exceptions import RayActorError, RayTaskError

    # A task error carries the actor's own exception; its last line is the one the user needs.
    text = str(error.cause if isinstance(error, RayTaskError) and error.cause else error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    # A dead actor's last line runs on with troubleshooting advice: its first sentence says it.
    line = lines[-1].split(". ")[0].rstrip(".") if isinstance(error, RayActorError) else lines[-1]
    # A worker's own error arrives as 'package.module.SomeError: message': the message is the line.
    head, sep, rest = line.partition(": ")
    return rest if sep and "." in head and head.replace(".", "").replace("_", "").isalnum() \
        and head.rsplit(".", 1)[1].endswith(("Error", "Exception")) else line


def dispatch(ray, actors: dict[str, object], shards: deque[Shard], on_result, log,
             all_lost: str = "finished shards are kept: rerun the same command with --resume") -> list[str]:
    """Feed shards to actors until all are done; returns the labels of lost actors.

    Results are labelled here with the device of the actor that computed them.
    Any actor with a ``run_shard(shard)`` whose result has a ``device`` field will do
    (the pose ``Worker``, the detector's ``DetectWorker``); ``all_lost`` ends the
    error when none is left.
    """
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
                try:  # a failing device or an unreachable actor must not take more shards
                    ray.kill(alive[label], no_restart=True)
                except Exception:
                    pass
                del alive[label]
                lost.append(label)
            if not alive:
                raise RunError(f"every device was lost ({'; '.join(causes)}); {all_lost}")
        else:
            result.device = label
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


class WorkerPool:
    """The device workers of one command: started on first use, re-batched for each run of a sweep.

    ``Worker.set_batch`` reopens a worker's session only when the model file changes
    (a static OM per batch size); dynamic ONNX and torch sessions are kept. Lost
    workers stay out for the rest of the command.
    """

    def __init__(self, session: Session, cfg: RunConfig, backend: str) -> None:
        self.session, self.cfg, self.backend = session, cfg, backend
        self.actors: dict[str, object] = {}
        self.described: list[dict] = []
        self.started = False

    def ready(self, model_path: str, bs: int, out: Path, log) -> tuple[dict[str, object], list[dict]]:
        if not self.started:
            self.actors, self.described = start_workers(self.session, self.cfg, self.backend, model_path, bs, out)
            self.started = True
            log("workers: " + ", ".join(f"{d['device']} pid {d['pid']} on {d['node']}" for d in self.described))
        else:
            if not self.actors:
                raise RunError("every device was lost in an earlier run of this command")
            try:
                self.session.ray.get([a.set_batch.remote(model_path, bs) for a in self.actors.values()])
            except Exception as e:
                raise RunError(f"a device worker could not switch to bs {bs}: {_first_line(e)}") from None
            write_json(out / "devices.json", [d for d in self.described if d["device"] in self.actors])
        return dict(self.actors), [dict(d) for d in self.described if d["device"] in self.actors]

    def drop(self, labels: list[str]) -> None:
        for label in labels:
            self.actors.pop(label, None)

    def close(self) -> None:
        for a in self.actors.values():
            try:
                self.session.ray.kill(a)
            except Exception:
                pass
        self.actors = {}


@contextmanager
def worker_pool(session: Session, cfg: RunConfig, backend: str) -> Iterator[WorkerPool]:
    pool = WorkerPool(session, cfg, backend)
    try:
        yield pool
    finally:
        pool.close()


#: The files of one finished run; a sweep's --resume keeps a batch size that has them all.
RUN_FILES = ("keypoints.json", "metrics.json", "throughput.json", "run.json")


def load_outcome(out: Path) -> RunOutcome:
    tp = json.loads((out / "throughput.json").read_text())
    return RunOutcome(out, json.loads((out / "metrics.json").read_text()), tp, tp.get("lost_devices", []))


def run(cfg: RunConfig, log=print) -> RunOutcome:
    """One run at one batch size; several batch sizes go to ``runner.sweep.run_sweep``."""
    if len(cfg.bs) != 1:
        raise RunError("several batch sizes: use the sweep (runner.sweep.run_sweep)")
    from runner.detect import plan_detection, run_planned_detection

    log = (lambda *a, **k: None) if cfg.quiet else log
    out = prepare_out(cfg)
    plan = plan_detection(cfg, log)  # --dets FILE not there yet and --detector-weights: detect first
    inputs = None if plan else load_inputs(cfg)
    with ray_session(cfg) as session:
        backend = choose_backend(cfg.backend, session.devices)
        cfg = settle_uint8_input(cfg, backend, session.devices)
        if plan:
            run_planned_detection(plan, session, cfg, backend, log)
            inputs = load_inputs(cfg)
        with worker_pool(session, cfg, backend) as pool:
            outcome = run_batch(cfg, session, pool, inputs, backend, cfg.bs[0], out, log)
    log(format_throughput(outcome.throughput))
    log(format_metrics(outcome.metrics))
    return outcome


def run_batch(cfg: RunConfig, session: Session, pool: WorkerPool, inputs: Inputs, backend: str, bs: int,
              out: Path, log, keep_finished: bool = False) -> RunOutcome:
    """One full pass over the boxes at batch size ``bs`` into ``out``: the body of a run.

    ``keep_finished``: with --resume, a run whose shards and files are all there is
    read back instead of being written again (a sweep's finished batch sizes).
    """
    box_set, weights, evaluated = inputs.box_set, inputs.weights, inputs.evaluated
    devices = session.devices
    model_path = prepare_model(cfg, backend, weights, box_set, bs, devices)
    journal = Journal(out / "journal", fingerprint(cfg, box_set, weights, backend, bs))
    done = journal.start(cfg.resume)
    shards = make_shards(box_set, bs, cfg.shard_size)
    todo = deque(s for s in shards if s.id not in done)
    if keep_finished and cfg.resume and not todo and all((out / n).exists() for n in RUN_FILES):
        log(f"bs {bs}: finished before, kept ({out})")
        return load_outcome(out)
    started = time.time()
    log(f"{len(box_set.boxes)} boxes in {len(shards)} shards ({len(done)} done before) on "
        f"{', '.join(str(d) for d in devices)}{' (Ray cluster)' if session.existing else ''}; "
        f"backend {backend}, bs {bs}")
    if "npu" in {d.kind for d in devices} and compute_device("npu", backend) == "cpu":
        log(f"note: backend {backend} computes on the CPU; the NPU slots only place the workers")
    fresh: list[ShardResult] = []
    described: list[dict] = []
    lost: list[str] = []
    first_dispatch = last_result = time.time()
    if todo:
        actors, described = pool.ready(model_path, bs, out, log)
        done_boxes = sum(len(r.box_ids) for r in done.values())
        progress = Progress(len(box_set.boxes), done_boxes, list(actors), len(shards), quiet=cfg.quiet, log=log,
                            title=f"bs {bs} ")

        def on_result(r: ShardResult) -> None:
            nonlocal last_result
            journal.add(r)
            fresh.append(r)
            last_result = time.time()
            progress.update(r)

        first_dispatch = time.time()
        try:
            lost = dispatch(session.ray, actors, todo, on_result, log)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: {len(done) + len(fresh)} of {len(shards)} shards are saved "
                              f"in {out / 'journal'}; rerun the same command with --resume") from None
        finally:
            progress.close()
        pool.drop(lost)
    for d in described:
        d["lost"] = d["device"] in lost
    if described:
        write_json(out / "devices.json", described)

    merged = merge_shards(list(done.values()) + fresh)
    records = pose_records(box_set.boxes, merged.box_ids, merged.keypoints, merged.crop_boxes)
    final = rescore_and_nms(records)
    write_json(out / "keypoints.json", final)

    skipped = [{"box_index": s.box_index, "image_id": s.image_id, "reason": s.reason} for s in box_set.skipped]
    by_id = {b.id: b for b in box_set.boxes}
    skipped += [{"box_index": i, "image_id": by_id[i].image_id, "reason": reason} for i, reason in merged.skipped]
    metrics = {"evaluated": evaluated and backend != "sim"}
    if metrics["evaluated"]:
        metrics.update(evaluate_keypoints(box_set.ann_file, final))
    else:
        metrics["accuracy"] = "n/a (simulated device)" if backend == "sim" else "n/a (no checkpoint)"
    metrics.update({"boxes": len(box_set.boxes) + len(box_set.skipped), "results_before_nms": len(records),
                    "results": len(final), "skipped": len(skipped), "complete": not skipped,
                    "skipped_boxes": skipped, "ann_file": box_set.ann_file, "box_source": box_set.source})
    write_json(out / "metrics.json", metrics)

    tp = throughput(fresh, described, first_dispatch, last_result)
    tp["totals"]["resumed_boxes"] = int(sum(len(r.box_ids) for r in done.values()))
    tp["lost_devices"] = lost
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
    return RunOutcome(out, metrics, tp, lost)


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
