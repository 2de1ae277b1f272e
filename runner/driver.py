"""``run(cfg)``: boxes -> shards -> one worker per device -> merge -> OKS-NMS -> COCOeval -> OUT.

This module composes a run: it checks the inputs, converts the model, cuts the
boxes into shards of whole batches, hands them to cluster/ (the Ray session, the
workers and the shard queue) and writes what comes back. Everything the run writes
to OUT is written atomically; finished shards are journalled for ``--resume``.
"""
from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.actor import Shard, ShardResult, Worker, WorkerConfig
from cluster.devices import Device
from cluster.dispatch import DispatchReport, dispatch
from cluster.errors import AllDevicesLost, Stopped
from cluster.placement import Placement, compute_device, opencv_threads, prep_threads
from cluster.pool import ActorPool, actor_pool
from cluster.reducer import format_throughput, merge_shards, throughput
from cluster.session import Session
from runner.config import RunConfig
from runner.control import ctrl_c_stops, dispatch_policy, session_for
from runner.errors import Interrupted, RunError
from runner.inputs import (Inputs, choose_backend, load_inputs, prepare_model, settle_uint8_input, soc_version,
                           variant_of)
from runner.journal import Journal
from runner.parity import check_parity
from runner.outputs import (TIMING_SCOPE, Laps, format_metrics, iso_time, peak_rss_mb, prepare_out, versions,
                            write_json, write_results)
from runner.progress import Progress
from tasks.dataset import BoxSet
from tasks.evaluation import evaluate_keypoints, nms_rows, pose_columns
from tasks.spec import file_sha256


@dataclass
class RunOutcome:
    out: Path
    metrics: dict
    throughput: dict
    lost_devices: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase of the run (outputs.Laps)


# ---------------------------------------------------------------- inputs


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
    laps = Laps()
    out = prepare_out(cfg)
    plan = plan_detection(cfg, log)  # --dets FILE not there yet and --detector-weights: detect first
    inputs = None if plan else load_inputs(cfg)
    laps.mark("inputs")
    with session_for(cfg) as session:
        laps.mark("ray_start")
        backend = choose_backend(cfg.backend, session.devices)
        cfg = settle_uint8_input(cfg, backend, session.devices)
        if plan:
            run_planned_detection(plan, session, cfg, backend, log)
            inputs = load_inputs(cfg)
            laps.mark("detection")
        with actor_pool(session, Worker, backend, cfg.threads) as pool:
            outcome = run_batch(cfg, session, pool, inputs, backend, cfg.bs[0], out, log)
            laps.mark("run")
    laps.mark("ray_stop")
    run_laps = laps.seconds.pop("run")
    outcome.phases = {**laps.seconds, **outcome.phases, "other": run_laps - sum(outcome.phases.values())}
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
            prep = prep_threads(cfg.prep_threads, p.in_process, backend, session.cpus_per_worker)
            return WorkerConfig(backend, model_path, p.in_process, p.label, p.device.kind, bs, p.threads, prep,
                                cfg.flip, dump_dir, variant_of(cfg), cfg.sim_rate,
                                opencv_threads(prep, p.in_process, backend, session.cpus_per_worker))

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


def run_batch(cfg: RunConfig, session: Session, pool: ActorPool, inputs: Inputs, backend: str, bs: int,
              out: Path, log, keep_finished: bool = False) -> RunOutcome:
    """One full pass over the boxes at batch size ``bs`` into ``out``: the body of a run.

    ``keep_finished``: with --resume, a run whose shards and files are all there is
    read back instead of being written again (a sweep's finished batch sizes).
    """
    box_set, weights, evaluated = inputs.box_set, inputs.weights, inputs.evaluated
    devices = session.devices
    laps = Laps()
    model_path = prepare_model(cfg, backend, weights, box_set, bs, devices)
    laps.mark("model")
    previous = Journal.previous_fingerprint(out / "journal") if cfg.resume else None
    # A resumed run keeps its shards, whatever the device count now.
    per_shard = (previous or {}).get("shard_boxes") or shard_boxes(len(box_set.boxes), bs, cfg.shard_size,
                                                                   len(devices))
    journal = Journal(out / "journal", fingerprint(cfg, box_set, weights, backend, bs, model_path, devices,
                                                   per_shard))
    done = journal.start(cfg.resume)
    shards = make_shards(box_set, per_shard)
    laps.mark("journal_and_shards")
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
        laps.mark("workers")
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
        laps.mark("dispatch_window")
    for d in described:
        d["lost"] = d["device"] in report.lost
        if d["lost"]:
            d["lost_reason"] = report.lost[d["device"]]
    if described:
        write_json(out / "devices.json", described)

    merged = merge_shards(list(done.values()) + fresh)
    # Columns until the file is written: the dicts of 100,000 results would hold ~400 MB at once.
    columns = pose_columns(box_set.boxes, merged.box_ids, merged.keypoints, merged.crop_boxes)
    laps.mark("merge_and_records")
    kept, scores = nms_rows(columns.image_ids, columns.scores, columns.keypoints, columns.areas)
    laps.mark("oks_nms")
    write_results(out / "keypoints.json", columns, kept, scores)
    laps.mark("write_keypoints")
    if cfg.check_backend:  # outside the dispatch window: not part of any throughput figure
        check_parity(cfg, inputs, backend, bs, merged, out, log)
        laps.mark("parity")

    skipped = [{"box_index": s.box_index, "image_id": s.image_id, "reason": s.reason} for s in box_set.skipped]
    by_id = {b.id: b for b in box_set.boxes}
    skipped += [{"box_index": i, "image_id": by_id[i].image_id, "reason": reason}
                for i, reason in sorted(merged.skipped + failed)]
    metrics = {"evaluated": evaluated and backend != "sim"}
    if metrics["evaluated"]:
        metrics.update(evaluate_keypoints(box_set.ann_file, columns.records(kept, scores), cfg.evaluator))
        laps.mark("evaluation")
    else:
        metrics["accuracy"] = "n/a (simulated device)" if backend == "sim" else "n/a (no checkpoint)"
    metrics.update({"boxes": len(box_set.boxes) + len(box_set.skipped), "results_before_nms": len(columns),
                    "results": len(kept), "skipped": len(skipped), "complete": not skipped,
                    "skipped_boxes": skipped, "ann_file": box_set.ann_file, "box_source": box_set.source})
    write_json(out / "metrics.json", metrics)

    if fresh or not (out / "throughput.json").exists():
        tp = run_throughput(fresh, done, described, report, first_dispatch, last_result, out)
        write_json(out / "throughput.json", tp)
        laps.mark("write_metrics_throughput")
        finished = time.time()
        write_json(out / "run.json", {
            "config": asdict(cfg), "bs": bs, "backend": backend, "model_path": model_path,
            "model": {"name": "FastPose ResNet-50 256x192", "file": Path(model_path).name},
            "devices": described,
            "device_specs": [{"kind": d.kind, "id": d.id, "name": d.name, "soc": d.soc} for d in devices],
            "versions": versions(), "weights": weights, "weights_sha256": journal.fingerprint["weights_sha256"],
            "box_source": box_set.source, "box_source_sha256": journal.fingerprint["box_source_sha256"],
            "boxes": len(box_set.boxes), "skipped_boxes": len(box_set.skipped),
            "started": started, "finished": finished, "started_iso": iso_time(started), "finished_iso": iso_time(finished),
            "phases_seconds": dict(laps.seconds), "driver_peak_rss_mb": peak_rss_mb(),
            "timing_scope": dict(tp["labels"], **TIMING_SCOPE)})
    else:  # a resume with nothing left to run: the figures of the run that computed it stay
        tp = json.loads((out / "throughput.json").read_text())
    laps.mark("write_run")
    return RunOutcome(out, metrics, tp, list(tp.get("lost_devices", [])), laps.seconds)


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


