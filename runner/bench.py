"""``python -m runner bench``: how close the whole runner gets to the backend alone, and how it scales.

1. **bare vs end to end**: the backend alone on crops already in memory (its
   inputs prepared beforehand, only the backend calls timed) against a full run
   of the runner on the same boxes, with the same backend, bs, threads and
   variant. The ratio is what the framework costs: reading, cropping,
   normalising, Ray, merging and decoding that the device does not hide.
   ``--rounds R`` interleaves them, bare first and last (bare, run, bare, ...,
   run, bare), and divides the mean run by the mean bare, so the host's drift
   over minutes falls on both sides alike.
2. **scaling**: 1..N ``sim`` devices of ``--sim-rate`` network inputs per
   second each, through the full runner, against the ideal of N times what one
   sim device reaches alone without Ray. On a host with few cores this answers
   "how many cores do N such cards need?".

Every figure is printed; the last line is one JSON object with all of them, also
written to ``OUT/bench.json``. Each run keeps its own files under ``OUT``.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cluster.actor import chunk_boxes
from cluster.devices import parse_devices
from cluster.host_work import ImageCache, reuse_freed_memory
from cluster.placement import placements
from runner.config import RunConfig, changed
from runner.driver import run
from runner.errors import RunError
from runner.inputs import load_inputs, prepare_model
from runner.plan import settle
from tasks.files import atomic_write_text
from tasks.backends import open_backend
from tasks.decode import decode_keypoints
from tasks.pipeline import merge_heatmaps, network_inputs, output_shape, prepare_batch, run_network, warm_up
from tasks.dataset import read_rgb
from tasks.spec import FASTPOSE
from tasks.variant import Variant

#: Distinct boxes whose inputs the bare loop holds in memory; it cycles through them
#: for as many batches as the run has (float inputs of one box with flip: 1.2 MB).
IN_MEMORY_BOXES = 512


def bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runner bench", add_help=False,
        description="Backend alone vs the full runner on the same crops, and scaling over simulated devices. "
                    "Takes the run flags too (--dataroot/--dets/--weights or --synthetic N, --backend, --bs, "
                    "--threads, --fused-flip, --uint8-input, --sim-rate, --out).")
    p.add_argument("--sim-devices", type=int, default=2, metavar="N",
                   help="scale over 1..N sim devices (0: skip the scaling part)")
    p.add_argument("--sim-seconds", type=float, default=6.0,
                   help="about how long each scaling run lasts at the ideal rate")
    p.add_argument("--scale", type=int, default=0, metavar="N",
                   help="instead: N synthetic boxes on up to 5,000 images of 480x640 (written once into "
                        "--models-dir) through --sim-devices sim devices; prints where the whole command's time "
                        "goes and the driver's peak memory. Several --bs run a sweep")
    p.add_argument("--rounds", type=int, default=3, metavar="R",
                   help="full runs, each between two bare measurements (default 3)")
    p.add_argument("--skip-bare", action="store_true", help="only the scaling part")
    p.add_argument("--host-bare-processes", type=int, default=0, metavar="N",
                   help="measure the bare host work (no device) on N processes too; 0: the cores per device")
    return p


#: Whether each backend's call keeps Python's GIL (docs/throughput.md#the-gil); sim's is --sim-gil.
BACKEND_GIL = {"om": "hold", "onnxruntime": "release", "torch": "release", "openvino": "release"}


def gil_mode(cfg: RunConfig, backend: str) -> str:
    return cfg.backend.sim_gil if backend == "sim" else BACKEND_GIL[backend]


def bare_throughput(cfg: RunConfig) -> dict:
    """The backend alone on the run's crops, prepared in memory first; crops (network inputs) per second.

    The backend is opened as a ``--devices cpu`` worker would open it: same
    threads, bs and variant. Only ``run_network`` (the backend calls) is timed.
    """
    inputs_ = load_inputs(cfg)
    box_set = inputs_.box_set
    devices = parse_devices(cfg.cluster.devices)
    if len(devices) != 1 and cfg.backend.name != "sim":
        raise RunError("the bare figure is for one device: --devices cpu (or one accelerator); several only "
                       "with --backend sim (identical devices: one is measured)")
    devices = devices[:1]
    plan = settle(cfg, devices)[0]  # the bare figure is one model: the first --precision-mode
    backend_name, bs = plan.backend, cfg.bs[0]
    model_path = prepare_model(cfg, plan, inputs_.weights, box_set, bs)
    placement = placements(devices, backend_name, cfg.backend.threads, float(os.cpu_count() or 1))[0]
    backend = open_backend(backend_name, model_path, placement.compute_device, bs, placement.threads,
                           plan.variant, cfg.backend.sim_rate, cfg.backend.sim_gil)
    boxes = box_set.boxes
    held = boxes[:max(bs, IN_MEMORY_BOXES // bs * bs)]
    images = {b.image_id: read_rgb(box_set.image_paths[b.image_id]) for b in held}
    distinct = [network_inputs(prepare_batch(held[i:i + bs], images).crops, backend.variant, plan.flip)
                for i in range(0, len(held), bs)]
    sizes = [min(bs, len(boxes) - i) for i in range(0, len(boxes), bs)]  # the run's batches
    batches = [[x[:n] for x in distinct[k % len(distinct)]] for k, n in enumerate(sizes)]
    crops = sum(len(inputs[0]) * (2 if backend.variant.fused_flip else len(inputs)) for inputs in batches)
    # the outputs written into memory of the caller's, as a worker has the backend write them into its slot
    outs = [np.empty(output_shape(bs), np.float32) for _ in batches[0]]
    try:
        warm_up(backend, plan.flip)  # as every worker does before its first shard
        t0 = time.perf_counter()
        for inputs in batches:
            run_network(backend, inputs, [o[:len(inputs[0])] for o in outs])
        seconds = time.perf_counter() - t0
    finally:
        backend.close()
    return {"backend": backend_name, "bs": bs, "threads": placement.threads, "crops": crops,
            "crops_per_s": crops / seconds, "uint8_input": plan.variant.uint8_input}


def host_work_part(boxes: list, paths: dict[int, str], variant: Variant, flip: bool, bs: int) -> tuple[float, float]:
    """The host work of ``boxes`` in this process, no device: (start, end) on the system's monotonic clock.

    Per chunk of boxes (``cluster.actor.chunk_boxes``) what a worker's host processes do:
    read (the last 16 images cached, as there), crop, build the inputs, then merge and
    decode heatmaps of the right shape, one array per pass as a device gives them.

    The heatmaps are written once before the loop: ``np.zeros`` leaves its pages
    untouched, and every read of an untouched page reads the kernel's one zero page,
    which stays in the core's cache (the flip merge of 10,000 boxes took 0.66 s there
    against 1.06 s on heatmaps in memory).
    """
    reuse_freed_memory()  # as a worker's host processes do
    cache = ImageCache()
    passes = 1 if variant.fused_flip or not flip else 2
    chunk = chunk_boxes(bs)
    heatmaps = [np.full((chunk, FASTPOSE.num_joints, *FASTPOSE.heatmap_hw), 0.0, np.float32) for _ in range(passes)]
    start = time.perf_counter()
    for i in range(0, len(boxes), chunk):
        part = boxes[i:i + chunk]
        prepared = prepare_batch(part, {b.image_id: cache.get(paths[b.image_id], read_rgb) for b in part})
        network_inputs(prepared.crops, variant, flip)
        decode_keypoints(merge_heatmaps([h[:len(part)] for h in heatmaps]), prepared.crop_boxes)
    return start, time.perf_counter()


def host_alone(cfg: RunConfig, processes: int) -> dict:
    """Boxes per second of the bare host work on ``processes`` processes, each a contiguous part of the boxes:
    what the host could feed a device that took no time."""
    inputs_ = load_inputs(cfg)
    plan = settle(cfg, parse_devices(cfg.cluster.devices))[0]
    boxes, paths = inputs_.box_set.boxes, inputs_.box_set.image_paths
    part = math.ceil(len(boxes) / processes)
    with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(time.sleep, [0.5] * processes))  # every process started before anything is timed
        list(pool.map(host_work_part, [[]] * processes, [paths] * processes, [plan.variant] * processes,
                      [plan.flip] * processes, [cfg.bs[0]] * processes))  # and this module imported
        spans = list(pool.map(host_work_part, *zip(*[(boxes[k:k + part], paths, plan.variant, plan.flip, cfg.bs[0])
                                                     for k in range(0, len(boxes), part)])))
    seconds = max(e for _, e in spans) - min(s for s, _ in spans)
    return {"processes": processes, "boxes": len(boxes), "boxes_per_s": len(boxes) / seconds,
            "uint8_input": plan.variant.uint8_input}


def bare_in_child(cfg: RunConfig) -> dict:
    """``bare_throughput`` in a process of its own: the thread pools a backend leaves
    behind (OpenVINO's measured 19 instead of 31 crops/s in the run that followed it
    in the same driver) are gone before anything else is timed."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(bare_throughput, cfg).result()


def e2e_throughput(cfg: RunConfig, out: Path) -> dict:
    """A full run of the runner into ``out``; its end-to-end figures from throughput.json."""
    (outcome,) = run(changed(cfg, out=str(out), overwrite=True, resume=False, quiet=True))
    t = outcome.throughput["totals"]
    idle = sum(d["idle_seconds"] for d in outcome.throughput["devices"])
    return {"crops": t["crops"], "crops_per_s": t["e2e_crops_per_s"], "boxes_per_s": t["e2e_boxes_per_s"],
            "wall_seconds": t["wall_seconds"], "sum_device_fps": t["sum_device_fps"],
            "bytes_to_device_per_box": t["bytes_to_device_per_box"],
            "bytes_from_device_per_box": t["bytes_from_device_per_box"], "idle_seconds": idle,
            "out": str(out)}


def last_run_latency(out: Path) -> dict:
    """Per device of the run in ``out`` (its throughput.json): call_ms, host_seconds, host_dominant."""
    tp = json.loads((out / "throughput.json").read_text())
    return {d["id"]: {"call_ms": d.get("call_ms", {}), "host_seconds": d.get("host_seconds", {}),
                      "host_dominant": d.get("host_dominant")} for d in tp["devices"]}


def format_latency(latency: dict) -> list[str]:
    """One line per device: the per-call device time's p50/p99 and the host stage that dominates."""
    lines = []
    for device, fig in latency.items():
        calls, stages, top = fig["call_ms"], fig["host_seconds"], fig["host_dominant"]
        if not calls.get("n"):
            continue
        where = f"; host time dominated by {top} ({stages[top]:.2f} s)" if top else ""
        lines.append(f"last run, {device}: {calls['n']} calls, device ms per call p50 {calls['p50']:.2f}, "
                     f"p99 {calls['p99']:.2f} (max {calls['max']:.2f}){where}")
    return lines


def scaling(cfg: RunConfig, max_devices: int, seconds: float, out: Path, log) -> dict:
    """1..N sim devices through the runner against N x one sim device alone without Ray."""
    crops_per_box = 2 if cfg.model.flip.flip else 1
    boxes = math.ceil(seconds * max_devices * cfg.backend.sim_rate / crops_per_box)
    # Enough whole shards per device that the tail is short against the run.
    sim = changed(cfg, backend="sim", synthetic=boxes, dataroot=None, dets=None, boxes=None, weights=None,
                  devices="cpu")
    alone_bare = bare_in_child(sim)
    alone = alone_bare["crops_per_s"]
    log(f"one sim device alone, no Ray: {alone:.1f} crops/s (rate {cfg.backend.sim_rate:g})")
    rows = []
    for n in range(1, max_devices + 1):
        got = e2e_throughput(changed(sim, devices=f"cpu:{n}"), out / f"sim-{n}")
        ideal = n * alone
        rows.append({"devices": n, "crops_per_s": got["crops_per_s"], "ideal_crops_per_s": ideal,
                     "of_ideal": got["crops_per_s"] / ideal, "idle_seconds": got["idle_seconds"],
                     "boxes": boxes})
        log(f"{n} sim device(s): {got['crops_per_s']:.1f} crops/s end to end, ideal {ideal:.1f}: "
            f"{got['crops_per_s'] / ideal:.3f} of ideal (devices idle {got['idle_seconds']:.2f} s in all)")
    return {"sim_rate": cfg.backend.sim_rate, "uint8_input": alone_bare["uint8_input"], "alone_crops_per_s": alone,
            "boxes": boxes, "runs": rows}


#: The scale set is shaped like val2017: 5,000 images, about 2 annotated persons each (val2017
#: has 11,004 person annotations), and a detector's many more boxes (the AP56.4 file: 104,125).
SCALE_IMAGES = 5000
SCALE_PERSONS_PER_IMAGE = 2


def scale_set(models_dir: str, boxes: int, seed: int) -> dict:
    """``boxes`` synthetic person boxes on up to 5,000 JPEGs of 480x640, written once and reused:
    a jittered box per GT person, then low-score boxes spread over the images, in image order."""
    from tasks.synthetic import write_synthetic_coco

    root = Path(models_dir) / "scale" / f"n{boxes}-seed{seed}"
    paths = {"dataroot": str(root), "dets": str(root / "detections" / "dets.json")}
    done = root / "complete"
    if not done.exists():
        persons = min(boxes, SCALE_IMAGES * SCALE_PERSONS_PER_IMAGE)
        images = math.ceil(persons / SCALE_PERSONS_PER_IMAGE)
        written = write_synthetic_coco(root, persons, seed=seed, persons_per_image=SCALE_PERSONS_PER_IMAGE,
                                       image_hw=(480, 640), extra_dets_per_image=math.ceil((boxes - persons) / images))
        dets = Path(written["dets"])
        atomic_write_text(dets, json.dumps(json.loads(dets.read_text())[:boxes]))
        done.write_text("")  # last: the set is whole
    return paths


def _run_in_child(cfg: RunConfig) -> list:
    """The run (or sweep) in a fresh process, so its peak memory is the driver's alone."""
    return run(cfg)


def scale(cfg: RunConfig, boxes: int, sim_devices: int, log) -> dict:
    """Where the whole command's time goes at ``boxes`` boxes on sim devices, and the driver's memory."""
    from runner.inputs import random_checkpoint
    from tasks.evaluation import evaluate_keypoints

    models_dir, seed = cfg.model.models_dir, cfg.data.seed
    coco = scale_set(models_dir, boxes, seed)
    run_cfg = changed(cfg, dataroot=coco["dataroot"], dets=coco["dets"], boxes=None, synthetic=0,
                      weights=random_checkpoint(models_dir, seed), backend="sim", devices=f"cpu:{max(1, sim_devices)}",
                      out=str(Path(cfg.output.out) / f"scale-{boxes}"), overwrite=True, resume=False, quiet=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        outcomes = pool.submit(_run_in_child, run_cfg).result()
    command = time.perf_counter() - t0
    runs = []
    for outcome in outcomes:
        run_json = json.loads((outcome.out / "run.json").read_text())
        phases = outcome.phases if len(outcomes) == 1 else run_json["phases_seconds"]
        window = phases.get("dispatch_window", 0.0)
        runs.append({"bs": run_json["bs"], "phases_seconds": phases, "dispatch_window_s": window,
                     "outside_window_s": sum(phases.values()) - window,
                     "e2e_crops_per_s": outcome.throughput["totals"]["e2e_crops_per_s"],
                     "driver_peak_rss_mb": run_json["driver_peak_rss_mb"], "out": str(outcome.out)})
    last = outcomes[-1]
    results = json.loads((last.out / "keypoints.json").read_text())
    t1 = time.perf_counter()
    stats = evaluate_keypoints(str(Path(coco["dataroot"]) / "annotations" / "person_keypoints_val2017.json"),
                               results, cfg.evaluation.evaluator)
    evaluation = time.perf_counter() - t1
    for r in runs:
        log(f"bs {r['bs']}: dispatch window {r['dispatch_window_s']:.1f} s, outside it {r['outside_window_s']:.1f} s "
            f"({', '.join(f'{k} {v:.2f}' for k, v in r['phases_seconds'].items() if k != 'dispatch_window')}); "
            f"{r['e2e_crops_per_s']:.0f} crops/s in the window")
    peak = max(r["driver_peak_rss_mb"] for r in runs)
    log(f"{boxes} boxes on {sim_devices} sim devices: the whole command {command:.1f} s (its process start "
        f"included), driver peak RSS {peak:.0f} MiB; {stats['evaluator']} on {len(results)} results (not part "
        f"of a sim run): {evaluation:.1f} s")
    return {"boxes": boxes, "sim_devices": sim_devices, "sim_rate": cfg.backend.sim_rate, "command_seconds": command,
            "driver_peak_rss_mb": peak, "evaluation_seconds": evaluation, "evaluator": stats["evaluator"],
            "results": len(results), "runs": runs}


def bare_host_processes(cfg: RunConfig, args: argparse.Namespace) -> int:
    """How many processes the bare host work runs on: --host-bare-processes, else the cores per device."""
    return args.host_bare_processes or max(1, (os.cpu_count() or 1) // len(parse_devices(cfg.cluster.devices)))


def against_host(cfg: RunConfig, args: argparse.Namespace, e2e: list[dict], bare_crops_per_s: float,
                 host_before: dict, log) -> dict:
    """End to end against the lesser of the device alone and the bare host work: the share of what is possible.

    The bare host work is measured before the first run (``host_before``) and after
    the last, and the mean taken, as the device's bare figure is interleaved.
    """
    processes = host_before["processes"]
    after = host_alone(cfg, processes)
    host = {**after, "boxes_per_s": (host_before["boxes_per_s"] + after["boxes_per_s"]) / 2,
            "runs_boxes_per_s": [host_before["boxes_per_s"], after["boxes_per_s"]]}
    devices = len(parse_devices(cfg.cluster.devices))  # several only for sim: identical, one measured
    device = devices * bare_crops_per_s / (e2e[-1]["crops_per_s"] / e2e[-1]["boxes_per_s"])  # 2 crops a box: flip
    e2e_boxes = float(np.mean([e["boxes_per_s"] for e in e2e]))
    possible = min(device, host["boxes_per_s"])
    log(f"bare host work on {processes} processes: {host['boxes_per_s']:.0f} boxes/s (before the runs "
        f"{host_before['boxes_per_s']:.0f}, after {after['boxes_per_s']:.0f}); the device{'s' * (devices > 1)} "
        f"alone {device:.0f} boxes/s; end to end {e2e_boxes:.0f} boxes/s = {e2e_boxes / possible:.3f} of the lesser")
    return {"host_alone": host, "device_alone_boxes_per_s": device, "e2e_boxes_per_s": e2e_boxes,
            "e2e_of_possible": e2e_boxes / possible}


def bench(cfg: RunConfig, args: argparse.Namespace, log=print) -> dict:
    out = Path(cfg.output.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.scale:
        figures = {"host_cpus": os.cpu_count(), "scale": scale(cfg, args.scale, args.sim_devices, log)}
        atomic_write_text(out / "bench.json", json.dumps(figures, indent=1))
        print(json.dumps(figures))
        return figures
    if len(cfg.bs) != 1:
        raise RunError("bench takes one --bs")
    figures: dict = {"host_cpus": os.cpu_count(), "bs": cfg.bs[0], "flip": cfg.model.flip.flip,
                     "fused_flip": cfg.model.flip.fused}
    if not args.skip_bare:
        if args.rounds < 1:
            raise RunError(f"--rounds {args.rounds}: give at least 1 full run")
        # A small VM's speed drifts by several percent over minutes (measured: 23.6 to
        # 26.9 crops/s for the same bare loop), so one bare figure next to one run puts
        # the drift into the ratio; interleaving spreads it over both sides.
        host_before = host_alone(cfg, bare_host_processes(cfg, args))
        bare = [bare_in_child(cfg)]
        gil = gil_mode(cfg, bare[0]["backend"])
        log(f"bare: {bare[0]['backend']} alone on {bare[0]['crops']} crops in memory, bs {bare[0]['bs']}, "
            f"{bare[0]['threads']} threads, {'uint8' if bare[0]['uint8_input'] else 'float'} input, GIL {gil} "
            f"during its calls: {bare[0]['crops_per_s']:.1f} crops/s")
        e2e = []
        for k in range(args.rounds):
            e2e.append(e2e_throughput(cfg, out / f"e2e-{k + 1}"))
            bare.append(bare_in_child(cfg))
            around = (bare[k]["crops_per_s"] + bare[k + 1]["crops_per_s"]) / 2
            log(f"round {k + 1}/{args.rounds}: end to end {e2e[k]['crops_per_s']:.1f} crops/s, then bare "
                f"{bare[k + 1]['crops_per_s']:.1f}; against the bare figures around it "
                f"{e2e[k]['crops_per_s'] / around:.3f}")
        bare_rate = float(np.mean([b["crops_per_s"] for b in bare]))
        e2e_rate = float(np.mean([e["crops_per_s"] for e in e2e]))
        ratio = e2e_rate / bare_rate
        log(f"mean end to end {e2e_rate:.1f} / mean bare {bare_rate:.1f} crops/s = {ratio:.3f}")
        last = e2e[-1]
        log(f"bytes per box: {last['bytes_to_device_per_box']:.0f} to the device, "
            f"{last['bytes_from_device_per_box']:.0f} back")
        latency = last_run_latency(Path(last["out"]))
        for line in format_latency(latency):
            log(line)
        figures.update(backend=bare[0]["backend"], gil=gil, threads=bare[0]["threads"],
                       uint8_input=bare[0]["uint8_input"], rounds=args.rounds,
                       bare_crops_per_s=bare_rate, bare_runs_crops_per_s=[b["crops_per_s"] for b in bare],
                       e2e_crops_per_s=e2e_rate, e2e_runs_crops_per_s=[e["crops_per_s"] for e in e2e],
                       e2e_over_bare=ratio,
                       bytes_to_device_per_box=last["bytes_to_device_per_box"],
                       bytes_from_device_per_box=last["bytes_from_device_per_box"],
                       e2e_idle_seconds=[e["idle_seconds"] for e in e2e], crops=last["crops"],
                       e2e_latency=latency,
                       **against_host(cfg, args, e2e, bare_rate, host_before, log))
    if args.sim_devices > 0:
        figures["scaling"] = scaling(cfg, args.sim_devices, args.sim_seconds, out, log)
    atomic_write_text(out / "bench.json", json.dumps(figures, indent=1))
    print(json.dumps(figures))
    return figures
