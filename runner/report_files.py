"""A run's report: ``OUT/timeline.json``, ``OUT/analysis.json``, ``OUT/report.html``; a sweep's index;
``runner show``.

Composed after the run's own files from what the driver already holds: the shard results
(the journal's and this run's), the queue's events and cancelled copies, the workers as
described, the metrics and the throughput. Nothing here talks to a device or to Ray. The
driver times it as the phase ``report``, after the dispatch window, so no throughput figure
includes it. ``--no-report`` keeps only the timeline (milliseconds): analysis.json's
COCOeval runs and the gallery's image reads are nearly all the cost at full-set scale.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cluster.actor import ShardResult
from cluster.queue import DispatchReport
from runner.errors import RunError
from runner.report_page import report_html, sweep_index_html
from tasks.dataset import IMAGES
from tasks.files import atomic_write_text
from tasks.keypoint_errors import analyze_keypoint_errors
from tasks.skeleton import gallery, show_images
from tasks.timeline import CallSpan, Marker, ShardSpan, TimelineRecords, build_timeline, records_from_timeline

#: People in the gallery, worst first: coco-mini's 12 annotated people are all of them.
GALLERY_PEOPLE = 12
#: Images ``runner show`` draws when none are named.
SHOW_IMAGES = 8
#: What run.json's timing_scope says of the phase.
REPORT_SCOPE = {"report": "the phase report: timeline.json, analysis.json, the gallery and report.html, after "
                          "the run's result files and outside every throughput figure"}


@dataclass
class RunRecord:
    """What the report needs of one batch size's run, as plain values (the driver fills it)."""

    out: Path
    title: str
    bs: int
    results: list[ShardResult]  # every kept shard: journalled before and computed now
    described: list[dict]  # the workers this run started: device, node, ...
    dispatch: DispatchReport  # the queue's events, copies and cancelled runs (empty for journalled shards)
    shard_boxes: dict[int, int]  # shard id -> its boxes: the size of a cancelled copy's span
    run_start: float  # unix seconds: the timeline's 0
    resumed: bool  # --resume: the earlier timeline's markers and lost copies are kept
    metrics: dict
    throughput: dict
    wall_seconds: float  # the batch size's run up to its files written
    backend: str


# ---------------------------------------------------------------- timeline.json


def _devices(rec: RunRecord) -> list[dict]:
    """The workers: this run's, else (a resume that ran nothing) those of devices.json."""
    if rec.described:
        return rec.described
    saved = rec.out / "devices.json"
    return json.loads(saved.read_text()) if saved.exists() else []


def _earlier(rec: RunRecord) -> TimelineRecords:
    """A resumed run's earlier timeline (its shards come back from the journal; its markers and
    lost copies only from here); nothing for a fresh run."""
    path = rec.out / "timeline.json"
    if not (rec.resumed and path.exists()):
        return TimelineRecords()
    return records_from_timeline(json.loads(path.read_text()))


def _shard_spans(rec: RunRecord, node: Callable[[str], str]) -> list[ShardSpan]:
    """The kept results, then every run whose sibling won (sent -> cancelled, ``won: false``)."""
    spans = [ShardSpan(r.device, node(r.device), int(r.shard_id), len(r.box_ids), r.started, r.finished,
                       copy=(r.shard_id, r.device) in rec.dispatch.won_by_copy) for r in rec.results]
    spans += [ShardSpan(c.worker, node(c.worker), int(c.shard), rec.shard_boxes.get(c.shard, 0), c.sent,
                        c.cancelled, copy=c.copy, won=False) for c in rec.dispatch.cancelled]
    return spans


def _call_spans(rec: RunRecord, node: Callable[[str], str]) -> list[CallSpan]:
    """One per backend call; a journal older than call_starts gives none for its shards."""
    return [CallSpan(r.device, node(r.device), float(s), float(d), int(r.shard_id), rec.bs)
            for r in rec.results for s, d in zip(r.call_starts, r.call_seconds)]


def timeline(rec: RunRecord) -> dict:
    """timeline.json's object: a track per device in the table's order, every shard run, call and marker."""
    earlier, described = _earlier(rec), _devices(rec)
    nodes = {s.device: s.node for s in earlier.shards} | {d["device"]: d.get("node", "") for d in described}
    node = lambda device: nodes.get(device, "")  # noqa: E731
    markers = [Marker(e.time, e.kind, e.text, e.worker, node(e.worker) if e.worker else None)
               for e in rec.dispatch.events]
    lost_before = [s for s in earlier.shards if not s.won]
    starts = [rec.run_start, *(r.started for r in rec.results), *(s.start for s in lost_before),
              *(m.time for m in earlier.markers)]
    return build_timeline(_shard_spans(rec, node) + lost_before, _call_spans(rec, node), earlier.markers + markers,
                          run_start=min(starts), devices=[(d["device"], d.get("node", "")) for d in described],
                          other={"bs": rec.bs})


# ---------------------------------------------------------------- report.html


def summary_of(rec: RunRecord) -> dict:
    """The page's summary rows: mAP, boxes, completeness first."""
    m, totals = rec.metrics, rec.throughput["totals"]
    out = {"mAP": m.get("AP") if m.get("evaluated") else None, "boxes": m["boxes"], "complete": m["complete"],
           "results": m["results"], "skipped": m["skipped"]}
    if not m.get("evaluated"):
        out["accuracy"] = m.get("accuracy")
    out.update({"backend": rec.backend, "bs": rec.bs, "evaluator": m.get("evaluator", "-"),
                "run wall s": rec.wall_seconds, "dispatch window s": totals.get("wall_seconds"),
                "e2e boxes/s": totals.get("e2e_boxes_per_s"), "sum of device fps": totals.get("sum_device_fps"),
                "speculative copies": totals.get("speculative_copies", 0),
                "lost devices": ", ".join(rec.throughput.get("lost_devices", [])) or "none"})
    return out


def device_table(throughput: Mapping) -> list[dict]:
    """One row per device of throughput.json, named as the timeline's tracks are (device @ node)."""
    rows = []
    for r in throughput["devices"]:
        ms = r.get("call_ms", {})
        rows.append({"device": r["id"], "node": r.get("node", ""), "kind": r.get("kind"), "boxes": r.get("boxes"),
                     "device fps": r.get("device_fps"), "calls": ms.get("n"), "p50 ms": ms.get("p50"),
                     "p90 ms": ms.get("p90"), "p99 ms": ms.get("p99"), "idle s": r.get("idle_seconds"),
                     "copies won": r.get("copies_won", 0), "lost": r.get("lost", False)})
    return rows


def _drawable(image_paths: Mapping[int, str], metrics: Mapping) -> dict[int, str]:
    """The images worth drawing: those whose boxes all ran (a skipped one may be missing or corrupt)."""
    skipped = {s["image_id"] for s in metrics.get("skipped_boxes", [])}
    return {i: p for i, p in image_paths.items() if i not in skipped}


def gallery_items(rec: RunRecord, image_paths: Mapping[int, str], results: list[dict], gt: dict | None
                  ) -> list[tuple[str, bytes]]:
    """The worst people drawn; none for ``--backend sim``, whose keypoints no network computed.
    A synthetic run's random network is drawn as it is: it shows what the run computed."""
    if rec.backend == "sim" or not results:
        return []
    return gallery(_drawable(image_paths, rec.metrics), results, gt, GALLERY_PEOPLE)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def write_report(rec: RunRecord, full: bool, results: Callable[[], list[dict]], image_paths: Mapping[int, str],
                 ann_file: str, evaluator: str) -> None:
    """timeline.json always; with ``full`` (no --no-report) analysis.json where the run was evaluated,
    and report.html. ``results``: keypoints.json's records, made only when needed."""
    trace = timeline(rec)
    atomic_write_text(rec.out / "timeline.json", json.dumps(trace, separators=(",", ":")))
    if not full:
        for name in ("analysis.json", "report.html"):  # an earlier run's report would no longer be this run's
            (rec.out / name).unlink(missing_ok=True)
        return
    # A sim run needs neither its records nor the GT: at 100,000 boxes the records alone are ~400 MB.
    records = results() if rec.backend != "sim" or rec.metrics.get("evaluated") else []
    gt = json.loads(Path(ann_file).read_text()) if records and Path(ann_file or "").is_file() else None
    analysis = None
    if rec.metrics.get("evaluated") and gt is not None:
        analysis = analyze_keypoint_errors(gt, records, evaluator)
        atomic_write_text(rec.out / "analysis.json", json.dumps(analysis, indent=1))
    else:
        (rec.out / "analysis.json").unlink(missing_ok=True)
    page = report_html(rec.title, summary_of(rec), device_table(rec.throughput), trace, analysis,
                       _read_json(rec.out / "parity.json"), gallery_items(rec, image_paths, records, gt))
    atomic_write_text(rec.out / "report.html", page)


# ---------------------------------------------------------------- a sweep's index


def write_sweep_index(out: Path, runs: Sequence[Path]) -> Path:
    """OUT/report.html of a sweep: summary.json's table, throughput.png inline, a link per run (``bs{N}/``,
    or ``bs{N}-{precision mode}/``)."""
    summary = json.loads((out / "summary.json").read_text())
    pages = [(d.name.replace("bs", "bs ", 1), f"{d.name}/report.html") for d in runs if (d / "report.html").exists()]
    plot = out / "throughput.png"
    rows = [{k: v for k, v in row.items() if k != "dir"} for row in summary["rows"]]
    page = sweep_index_html(f"sweep · {', '.join(d.name for d in runs)} · {out.name}", rows, pages,
                            plot.read_bytes() if plot.exists() else None, summary.get("knee"))
    atomic_write_text(out / "report.html", page)
    return out / "report.html"


# ---------------------------------------------------------------- runner show


def run_images(out: Path) -> tuple[dict[int, str], dict]:
    """The image files of a saved run (its annotation file's images under its image folder) and the GT."""
    run, metrics = json.loads((out / "run.json").read_text()), json.loads((out / "metrics.json").read_text())
    ann_file = metrics.get("ann_file") or ""
    if not Path(ann_file).is_file():
        raise RunError(f"{out}: the run's annotation file {ann_file or '(none)'} is not there; run show where the "
                       "run ran")
    gt = json.loads(Path(ann_file).read_text())
    folder = run.get("images_dir") or str(Path(run["config"]["dataroot"] or ".") / IMAGES)
    return {int(im["id"]): str(Path(folder) / im.get("file_name", f"{int(im['id']):012d}.jpg"))
            for im in gt["images"]}, gt


def show(out: Path, image_ids: Sequence[int] | None = None, dest: Path | None = None) -> list[Path]:
    """``runner show``: PNGs of the chosen images (default: the worst ``SHOW_IMAGES``) with skeletons drawn."""
    out = Path(out)
    if not (out / "keypoints.json").is_file() or not (out / "run.json").is_file():
        sweep = sorted(p.name for p in out.glob("bs*") if (p / "run.json").is_file())
        hint = f"; a sweep: give one of its runs, e.g. {out / sweep[0]}" if sweep else ""
        raise RunError(f"{out}: no finished run here (keypoints.json and run.json){hint}")
    paths, gt = run_images(out)
    results = json.loads((out / "keypoints.json").read_text())
    try:
        return show_images(paths, results, dest or out / "show", gt=gt, image_ids=image_ids or None, n=SHOW_IMAGES)
    except KeyError as e:
        raise RunError(f"--images: {e.args[0]} (the run's annotation file has {len(paths)} images)") from None
    except FileNotFoundError as e:
        raise RunError(f"{e}; run show where the run ran (its image folder)") from None
