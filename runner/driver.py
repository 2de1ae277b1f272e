"""``run(cfg)``: boxes -> shards -> one worker per device -> merge -> OKS-NMS -> COCOeval -> OUT.

A command runs every batch size of ``--bs`` with Ray and the workers started once; a
single ``--bs`` is a sweep of one, written straight into OUT (a sweep writes
``OUT/bs{N}/`` and a summary). Each batch size's run is these stages, each a function
a test can call alone:

    plan_batch  -> BatchPlan    the model file, the journal, the shards still to run
    execute     -> Executed     the workers ready, the shards run on them (cluster/)
    summarise   -> Summary      merge, records, OKS-NMS, parity, COCOeval, throughput
    write       -> RunOutcome   keypoints, metrics and throughput, atomically
    report                      timeline.json, analysis.json, report.html (runner.report_files)
    write_run                   run.json, last: its phases include the report's

Finished shards are journalled for ``--resume`` as they arrive.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.actor import Shard, ShardResult, Worker, WorkerConfig, chunk_boxes
from cluster.placement import Placement, host_processes, opencv_threads
from cluster.pool import ActorPool, actor_pool
from cluster.queue import DispatchReport
from cluster.reducer import Merged, format_throughput, merge_shards, throughput
from cluster.session import Session
from cluster.staging import ShippedModel
from runner.config import RunConfig, flat
from runner.control import StageLines, run_stage, session_for
from runner.errors import RunError
from runner.inputs import Inputs, load_inputs, prepare_model
from runner.shipping import DataNotShared, ImageShipping, data_sample, shipped_model
from runner.journal import Journal
from runner.outputs import (RUN_FILES, TIMING_SCOPE, Laps, format_metrics, iso_time, peak_rss_mb, prepare_out,
                            versions, write_json, write_results)
from runner.parity import check_parity
from runner.plan import RunPlan, settle
from runner.progress import Progress
from runner.report import write_summary
from runner.report_files import REPORT_SCOPE, RunRecord, write_report, write_sweep_index
from tasks.dataset import BoxSet
from tasks.evaluation import PoseColumns, evaluate_keypoints, nms_rows, pose_columns
from tasks.files import file_sha256


#: The network every run computes (run.json, the report's title).
MODEL_NAME = "FastPose ResNet-50 256x192"


@dataclass
class RunOutcome:
    out: Path
    metrics: dict
    throughput: dict
    lost_devices: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase of the run (outputs.Laps)


def run(cfg: RunConfig, log=print) -> list[RunOutcome]:
    """Every batch size of ``cfg.bs`` (on OM, for each ``--precision-mode``), in order: one outcome each."""
    if len(set(cfg.bs)) != len(cfg.bs):
        raise RunError(f"--bs {','.join(map(str, cfg.bs))}: a batch size is repeated")
    from runner.detect import plan_detection, run_planned_detection

    log = (lambda *a, **k: None) if cfg.output.quiet else log
    laps = Laps()
    out = prepare_out(Path(cfg.output.out), cfg.output, sweep=len(cfg.bs) * len(cfg.model.precision_modes) > 1)
    detection = plan_detection(cfg, log)  # --dets FILE not there yet and --detector-weights: detect first
    inputs = None if detection else load_inputs(cfg)
    laps.mark("inputs")
    with session_for(cfg) as session:
        laps.mark("ray_start")
        plans = settle(cfg, session.devices)
        backend = plans[0].backend
        if detection:
            run_planned_detection(detection, session, cfg, backend, log)
            inputs = load_inputs(cfg)
            laps.mark("detection")
        runs = [(plan, bs, run_dir(out, plan, bs, len(plans), len(cfg.bs))) for plan in plans for bs in cfg.bs]
        with actor_pool(session, Worker, backend, cfg.backend.threads, log=log) as pool:
            outcomes = [run_batch_size(cfg, plan, session, pool, inputs, bs, where, log, several=len(runs) > 1)
                        for plan, bs, where in runs]
            laps.mark("run")
    laps.mark("ray_stop")
    finish(cfg, out, outcomes, laps, log)
    return outcomes


def run_dir(out: Path, plan: RunPlan, bs: int, modes: int, sizes: int) -> Path:
    """OUT for a single run; ``OUT/bs{N}`` in a sweep; ``OUT/bs{N}-{precision mode}`` with several modes."""
    if modes * sizes == 1:
        return out
    return out / (f"bs{bs}-{plan.precision_mode}" if modes > 1 else f"bs{bs}")


def run_batch_size(cfg: RunConfig, plan: RunPlan, session: Session, pool: ActorPool, inputs: Inputs, bs: int,
                   out: Path, log, several: bool = False) -> RunOutcome:
    """One full pass over the boxes at ``bs`` into ``out`` (a run of a sweep when ``several``)."""
    if several:
        out = prepare_out(out, cfg.output)
    batch = plan_batch(cfg, plan, inputs, bs, out, log)
    if batch.finished_before:
        log(f"bs {bs}: finished before, kept ({out})")
        return load_outcome(out)
    executed = execute(batch, cfg, plan, session, pool, log)
    summary = summarise(batch, executed, cfg, plan, log)
    outcome = write(batch, summary)
    report(batch, executed, summary, outcome, cfg, plan)
    write_run(batch, executed, summary, cfg, plan, outcome.throughput)
    if several:
        totals = outcome.throughput["totals"]
        mode = f" {plan.precision_mode}" if out.name != f"bs{bs}" else ""  # several precision modes
        log(f"bs {bs}{mode}: {format_metrics(outcome.metrics).splitlines()[0]}, sum of device fps "
            f"{totals['sum_device_fps']:.1f}, e2e {totals['e2e_boxes_per_s']:.1f} boxes/s")
    return outcome


def finish(cfg: RunConfig, out: Path, outcomes: list[RunOutcome], laps: Laps, log) -> None:
    """A sweep's summary table and plot; a single run's figures and its phases with the command's."""
    if len(outcomes) > 1:
        from runner.report import load_run

        log(write_summary(out, [load_run(outcome.out) for outcome in outcomes]))
        log(f"summary: {out / 'summary.md'}, {out / 'summary.csv'}, {out / 'summary.json'}, "
            f"{out / 'throughput.png'}")
        if cfg.output.report:
            log(f"report: {write_sweep_index(out, [outcome.out for outcome in outcomes])}")
        else:
            (out / "report.html").unlink(missing_ok=True)  # an earlier sweep's index would link stale pages
        return
    (outcome,) = outcomes
    run_seconds = laps.seconds.pop("run")
    outcome.phases = {**laps.seconds, **outcome.phases, "other": run_seconds - sum(outcome.phases.values())}
    log(format_throughput(outcome.throughput))
    log(format_metrics(outcome.metrics))


def load_outcome(out: Path) -> RunOutcome:
    tp = json.loads((out / "throughput.json").read_text())
    return RunOutcome(out, json.loads((out / "metrics.json").read_text()), tp, tp.get("lost_devices", []))


# ---------------------------------------------------------------- plan


@dataclass
class BatchPlan:
    bs: int
    out: Path
    inputs: Inputs
    model_path: str
    journal: Journal
    per_shard: int  # boxes per shard
    shards: list[Shard]
    todo: list[Shard]  # not journalled yet, or journalled with skipped boxes (the file may read now)
    done: dict[int, ShardResult]  # journalled before, complete
    finished_before: bool  # --resume: nothing to run and every file there
    laps: Laps
    started: float = field(default_factory=time.time)


def plan_batch(cfg: RunConfig, plan: RunPlan, inputs: Inputs, bs: int, out: Path, log) -> BatchPlan:
    """The model file, the journal (resumed or fresh) and the shards of one batch size."""
    box_set, laps = inputs.box_set, Laps()
    model_path = prepare_model(cfg, plan, inputs.weights, box_set, bs)
    laps.mark("model")
    previous = Journal.previous_fingerprint(out / "journal") if cfg.output.resume else None
    # A resumed run keeps its shards, whatever the device count now.
    per_shard = (previous or {}).get("shard_boxes") or shard_boxes(len(box_set.boxes), bs, cfg.shard_size,
                                                                   len(plan.devices))
    journal = Journal(out / "journal", fingerprint(cfg, plan, inputs, bs, model_path, per_shard))
    done = journal.start(cfg.output.resume)
    shards = make_shards(box_set, per_shard)
    todo = [s for s in shards if s.id not in done or done[s.id].skipped]
    done = {k: r for k, r in done.items() if not r.skipped}
    laps.mark("journal_and_shards")
    finished = cfg.output.resume and not todo and all((out / n).exists() for n in RUN_FILES)
    return BatchPlan(bs, out, inputs, model_path, journal, per_shard, shards, todo, done, finished, laps)


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


def fingerprint(cfg: RunConfig, plan: RunPlan, inputs: Inputs, bs: int, model_path: str, per_shard: int) -> dict:
    """What decides the journalled numbers: a resume with any of it changed is refused."""
    import runner

    box_set, weights = inputs.box_set, inputs.weights
    source = box_set.source if box_set.source == "gt" else file_sha256(box_set.source)
    model = Path(model_path) if model_path else None
    own_file = model is not None and model.is_file() and model.resolve() != Path(weights).resolve()
    return {"boxes": len(box_set.boxes), "box_source_sha256": source, "ann_sha256": file_sha256(box_set.ann_file),
            "weights_sha256": file_sha256(weights), "backend": plan.backend, "bs": bs, "shard_size": cfg.shard_size,
            "shard_boxes": per_shard, "flip": plan.flip, "fused_flip": plan.variant.fused_flip,
            "uint8_input": plan.variant.uint8_input, "model_file": model.name if model else "",
            "model_sha256": file_sha256(str(model)) if own_file else "", "soc_version": plan.soc_version,
            "precision_mode": plan.precision_mode, "device_kinds": sorted({d.kind for d in plan.devices}),
            "runner_version": runner.__version__}


# ---------------------------------------------------------------- execute


@dataclass
class Executed:
    fresh: list[ShardResult]  # computed in this run, in arrival order
    failed: list[tuple[int, str]]  # (box id, why) of shards given up
    described: list[dict]  # the workers that ran, with lost and lost_reason
    report: DispatchReport
    first_dispatch: float
    last_result: float


def execute(batch: BatchPlan, cfg: RunConfig, plan: RunPlan, session: Session, pool: ActorPool, log) -> Executed:
    """Run the batch plan's shards on the pool; every result journalled as it arrives."""
    box_set = batch.inputs.box_set
    log(f"{len(box_set.boxes)} boxes in {len(batch.shards)} shards of {batch.per_shard} "
        f"({len(batch.done)} done before) on {', '.join(str(d) for d in plan.devices)}"
        f"{' (Ray cluster)' if session.existing else ''}; backend {plan.backend}, bs {batch.bs}")
    if "npu" in {d.kind for d in plan.devices} and plan.backend != "om":
        log(f"note: backend {plan.backend} computes on the CPU; the NPU slots only place the workers")
    now = time.time()
    executed = Executed([], [], [], DispatchReport(), now, now)
    if not batch.todo:
        return executed
    try:
        executed.described, shipping = ready_workers(batch, cfg, plan, session, pool, log)
    except DataNotShared:  # refused before any shard: the run leaves nothing behind
        batch.journal.discard_if_empty()
        if batch.out.is_dir() and not any(batch.out.iterdir()):
            batch.out.rmdir()
        raise
    batch.laps.mark("workers")
    progress = Progress(len(box_set.boxes), sum(len(r.box_ids) for r in batch.done.values()),
                        [d["device"] for d in executed.described], len(batch.shards), quiet=cfg.output.quiet,
                        log=log, title=f"bs {batch.bs} ")
    lines = StageLines(
        interrupted=lambda: (f"interrupted: {len(batch.done) + len(executed.fresh)} of {len(batch.shards)} shards "
                             f"are saved in {batch.out / 'journal'}; rerun the same command with --resume"),
        all_lost="finished shards are kept: rerun the same command with --resume")
    executed.first_dispatch = time.time()
    try:
        executed.report = run_stage(pool, batch.todo, lambda r: _journal(batch, executed, progress, r), log,
                                    cfg.queue, lambda shard, why: _give_up(executed, shard, why), lines,
                                    shipping.package, shipping.check)
    finally:
        progress.close()
    batch.laps.mark("dispatch_window")
    if shipping.bytes_shipped:
        seconds = max(1e-9, time.time() - executed.first_dispatch)
        log(f"images shipped in the shards of {len(shipping.ship_to)} workers: {shipping.bytes_shipped / 2**20:.1f} "
            f"MiB, {shipping.bytes_shipped / 2**20 / seconds:.1f} MiB/s over the dispatch window")
    for d in executed.described:
        d["lost"] = d["device"] in executed.report.lost
        if d["lost"]:
            d["lost_reason"] = executed.report.lost[d["device"]]
    write_json(batch.out / "devices.json", executed.described)
    return executed


def _journal(batch: BatchPlan, executed: Executed, progress: Progress, result: ShardResult) -> None:
    try:
        batch.journal.add(result)
    except OSError as e:
        raise RunError(f"{batch.journal.dir}: cannot save a finished shard ({e.strerror or e}); the "
                       f"{len(batch.done) + len(executed.fresh)} shards saved before are kept: free the disk, then "
                       "rerun the same command with --resume") from None
    executed.fresh.append(result)
    executed.last_result = time.time()
    progress.update(result)


def _give_up(executed: Executed, shard: Shard, why: str) -> None:
    executed.failed.extend((b.id, f"its shard failed on every try: {why}") for b in shard.boxes)


def ready_workers(batch: BatchPlan, cfg: RunConfig, plan: RunPlan, session: Session, pool: ActorPool,
                  log) -> tuple[list[dict], ImageShipping]:
    """The pose workers at the batch plan's size: started on first use, switched in a sweep's later runs.

    A worker that cannot switch (it died between two batch sizes) is dropped with one
    line and the run goes on with the others. ``OUT/devices.json`` says who runs where.
    """
    dump_dir = str((batch.out / "heatmaps").resolve()) if cfg.output.dump_heatmaps else None
    model = shipped_model(session, batch.model_path)
    if not pool.started:
        sample = data_sample(batch.inputs.box_set)
        described = pool.start(lambda p: worker_config(p, batch, cfg, plan, session, dump_dir, model, sample))
        log("workers: " + ", ".join(f"{d['device']}{_chip_note(d)} pid {d['pid']} on {d['node']}" for d in described))
    else:
        for label, why in pool.call_all("set_batch", batch.model_path, batch.bs, dump_dir, model).items():
            log(f"device {label} lost (it could not switch to bs {batch.bs}: {why}); the others go on")
        if not pool.actors:
            raise RunError(f"every device was lost ({'; '.join(f'{k}: {v}' for k, v in pool.lost.items())}); "
                           "rerun the same command with --resume to continue from the batch sizes done")
    described = pool.current()
    shipping = ImageShipping.decide(described, cfg.cluster.ship_images)  # before any file: never may stop here
    write_json(batch.out / "devices.json", described)
    return described, shipping


def _chip_note(described: dict) -> str:
    """' (chip 3)': the NPU a worker opened, as the worker found it (cluster.worker.pin_npu)."""
    return "" if described.get("chip") is None else f" (chip {described['chip']})"


def worker_config(p: Placement, batch: BatchPlan, cfg: RunConfig, plan: RunPlan, session: Session,
                  dump_dir: str | None, model: ShippedModel | None = None,
                  sample: tuple[tuple[str, int], ...] = ()) -> WorkerConfig:
    prep = host_processes(cfg.backend.host_processes, p.compute_device, plan.backend, session.cpus_per_worker)
    place = p.place(opencv_threads=opencv_threads(prep, p.compute_device, plan.backend, session.cpus_per_worker))
    return WorkerConfig(place=place, model_path=batch.model_path, batch_size=batch.bs, host_processes=prep,
                        flip=plan.flip, dump_dir=dump_dir, variant=plan.variant, sim_rate=cfg.backend.sim_rate,
                        sim_gil=cfg.backend.sim_gil, allow_opencv_mismatch=cfg.backend.allow_opencv_mismatch,
                        slot_boxes=max(chunk_boxes(bs) for bs in cfg.bs), model=model, data_sample=sample)


# ---------------------------------------------------------------- summarise


@dataclass
class Summary:
    merged: Merged
    columns: PoseColumns  # one row per box computed, before OKS-NMS
    kept: object  # rows OKS-NMS keeps (numpy indices), and their rescored scores
    scores: object
    metrics: dict
    throughput: dict | None  # None: a resume that computed nothing keeps the file there


def summarise(batch: BatchPlan, executed: Executed, cfg: RunConfig, plan: RunPlan, log) -> Summary:
    """Everything the run's files hold, computed from the journal and this run's results."""
    inputs, laps = batch.inputs, batch.laps
    merged = merge_shards(list(batch.done.values()) + executed.fresh)
    # Columns until the file is written: the dicts of 100,000 results would hold ~400 MB at once.
    columns = pose_columns(inputs.box_set.boxes, merged.box_ids, merged.keypoints, merged.crop_boxes)
    laps.mark("merge_and_records")
    kept, scores = nms_rows(columns.image_ids, columns.scores, columns.keypoints, columns.areas)
    laps.mark("oks_nms")
    if cfg.evaluation.check_backend:  # outside the dispatch window: not part of any throughput figure
        check_parity(cfg, plan, inputs, batch.bs, merged, batch.out, log)
        laps.mark("parity")
    metrics = {"evaluated": inputs.evaluated and plan.backend != "sim"}
    if metrics["evaluated"]:
        metrics.update(evaluate_keypoints(inputs.box_set.ann_file, columns.records(kept, scores),
                                          cfg.evaluation.evaluator))
        laps.mark("evaluation")
    else:
        metrics["accuracy"] = "n/a (simulated device)" if plan.backend == "sim" else "n/a (no checkpoint)"
    metrics.update(counts(inputs.box_set, merged, len(kept), executed.failed))
    tp = None
    if executed.fresh or not (batch.out / "throughput.json").exists():
        tp = run_throughput(batch, executed)
    return Summary(merged, columns, kept, scores, metrics, tp)


def counts(box_set: BoxSet, merged: Merged, results: int, failed: list[tuple[int, str]]) -> dict:
    """metrics.json's counts: boxes, results, completeness and every skipped box with its reason."""
    skipped = [{"box_index": s.box_index, "image_id": s.image_id, "reason": s.reason} for s in box_set.skipped]
    by_id = {b.id: b for b in box_set.boxes}
    skipped += [{"box_index": i, "image_id": by_id[i].image_id, "reason": reason}
                for i, reason in sorted(merged.skipped + failed)]
    return {"boxes": len(box_set.boxes) + len(box_set.skipped), "results_before_nms": len(merged.box_ids),
            "results": results, "skipped": len(skipped), "complete": not skipped, "skipped_boxes": skipped,
            "ann_file": box_set.ann_file, "box_source": box_set.source}


def run_throughput(batch: BatchPlan, executed: Executed) -> dict:
    """throughput.json: this run's shards; when it computed none, rebuilt from the journal."""
    report, done = executed.report, batch.done
    if not executed.fresh:
        results = list(done.values())
        known = {d["device"]: d for d in (json.loads((batch.out / "devices.json").read_text())
                                          if (batch.out / "devices.json").exists() else [])}
        rows = [known.get(label, {"device": label, "kind": label.split(":")[0]})
                for label in dict.fromkeys(r.device for r in results)]
        tp = throughput(results, rows, min(r.started for r in results), max(r.finished for r in results))
        tp["totals"]["rebuilt_from_journal"] = True
        tp["totals"]["resumed_boxes"] = 0
    else:
        tp = throughput(executed.fresh, executed.described, executed.first_dispatch, executed.last_result)
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


# ---------------------------------------------------------------- write


def write(batch: BatchPlan, summary: Summary) -> RunOutcome:
    """The run's result files, each atomically; a resume that computed nothing keeps its throughput.
    run.json comes last (``write_run``), after the report."""
    out, laps = batch.out, batch.laps
    write_results(out / "keypoints.json", summary.columns, summary.kept, summary.scores)
    laps.mark("write_keypoints")
    write_json(out / "metrics.json", summary.metrics)
    tp = summary.throughput
    if tp is None:
        tp = json.loads((out / "throughput.json").read_text())
    else:
        write_json(out / "throughput.json", tp)
    laps.mark("write_metrics_throughput")
    return RunOutcome(out, summary.metrics, tp, list(tp.get("lost_devices", [])), laps.seconds)


def report(batch: BatchPlan, executed: Executed, summary: Summary, outcome: RunOutcome, cfg: RunConfig,
           plan: RunPlan) -> None:
    """timeline.json, and unless --no-report analysis.json and report.html: the phase ``report``,
    after the dispatch window (runner.report_files)."""
    box_set = batch.inputs.box_set
    record = RunRecord(
        out=batch.out, title=f"{MODEL_NAME} · {plan.backend} · bs {batch.bs} · {batch.out.name}", bs=batch.bs,
        results=list(batch.done.values()) + executed.fresh, described=executed.described,
        dispatch=executed.report, shard_boxes={s.id: len(s.boxes) for s in batch.shards},
        run_start=executed.first_dispatch, resumed=cfg.output.resume, metrics=outcome.metrics,
        throughput=outcome.throughput, wall_seconds=time.time() - batch.started, backend=plan.backend)
    write_report(record, cfg.output.report, lambda: summary.columns.records(summary.kept, summary.scores),
                 box_set.image_paths, box_set.ann_file, cfg.evaluation.evaluator)
    batch.laps.mark("report")


def write_run(batch: BatchPlan, executed: Executed, summary: Summary, cfg: RunConfig, plan: RunPlan,
              tp: dict) -> None:
    """run.json, the last file: a resume that computed nothing keeps the one there."""
    if summary.throughput is not None or not (batch.out / "run.json").exists():
        write_json(batch.out / "run.json", run_record(batch, executed, cfg, plan, tp))
    batch.laps.mark("write_run")


def run_record(batch: BatchPlan, executed: Executed, cfg: RunConfig, plan: RunPlan, tp: dict) -> dict:
    """run.json: the configuration, versions, devices, inputs' sha256, times and phases."""
    inputs, journal, finished = batch.inputs, batch.journal, time.time()
    return {
        "config": flat(cfg), "bs": batch.bs, "backend": plan.backend, "model_path": batch.model_path,
        "plan": {"backend": plan.backend, "flip": plan.flip, "fused_flip": plan.variant.fused_flip,
                 "uint8_input": plan.variant.uint8_input, "om_gears": list(plan.gears or ()),
                 "soc_version": plan.soc_version, "precision_mode": plan.precision_mode},
        "model": {"name": MODEL_NAME, "file": Path(batch.model_path).name},
        "devices": executed.described,
        "device_specs": [{"kind": d.kind, "id": d.id, "name": d.name, "soc": d.soc} for d in plan.devices],
        "versions": versions(), "weights": inputs.weights, "weights_sha256": journal.fingerprint["weights_sha256"],
        "box_source": inputs.box_set.source, "box_source_sha256": journal.fingerprint["box_source_sha256"],
        "boxes": len(inputs.box_set.boxes), "skipped_boxes": len(inputs.box_set.skipped),
        "images_dir": images_dir(inputs.box_set),
        "started": batch.started, "finished": finished, "started_iso": iso_time(batch.started),
        "finished_iso": iso_time(finished), "phases_seconds": dict(batch.laps.seconds),
        "driver_peak_rss_mb": peak_rss_mb(), "timing_scope": dict(tp["labels"], **TIMING_SCOPE, **REPORT_SCOPE)}


def images_dir(box_set: BoxSet) -> str | None:
    """The folder of the run's images (``runner show`` finds them there)."""
    return str(Path(next(iter(box_set.image_paths.values()))).parent) if box_set.image_paths else None
