"""What a run writes to OUT, atomically, and how it prints its figures."""
from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from runner.config import OutputConfig
from runner.errors import RunError
from tasks.files import atomic_write_parts, atomic_write_text
from tasks.evaluation import STAT_NAMES, PoseColumns


#: The files of one finished run; --resume keeps a batch size that has them all.
RUN_FILES = ("keypoints.json", "metrics.json", "throughput.json", "run.json")
#: What a run's report adds (runner.report_files); at a sweep's top, report.html is its index.
REPORT_FILES = ("timeline.json", "analysis.json", "report.html")
#: What a sweep adds to OUT (runner.report.write_summary).
SUMMARY_FILES = ("summary.md", "summary.csv", "summary.json", "throughput.png")


def prepare_out(out: Path, output: OutputConfig, sweep: bool = False) -> Path:
    """``out`` ready for a run: refused when it holds results and neither --resume nor --overwrite is
    given; with --overwrite alone the earlier results go (a sweep's summary too)."""
    if out.exists() and any(out.iterdir()) and not (output.resume or output.overwrite):
        raise RunError(f"{out}: exists and is not empty; pass --resume to continue that run, "
                       "--overwrite to replace it, or another --out")
    if out.exists() and output.overwrite and not output.resume:
        for name in (*RUN_FILES, *REPORT_FILES, "devices.json", "parity.json", *(SUMMARY_FILES if sweep else ())):
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


#: Results turned into dicts and JSON at a time: ~20 MB of dicts, whatever the run's size.
RESULTS_PER_CHUNK = 10_000


def write_results(path: Path, columns: PoseColumns, rows: np.ndarray, scores: np.ndarray) -> None:
    """keypoints.json: ``json.dumps(columns.records(rows, scores))`` to the byte, compact as upstream
    writes its results, made a chunk of records at a time with json's C encoder."""
    def parts():
        yield "["
        for k in range(0, len(rows), RESULTS_PER_CHUNK):
            chunk = json.dumps(columns.records(rows[k:k + RESULTS_PER_CHUNK], scores[k:k + RESULTS_PER_CHUNK]))
            yield (", " if k else "") + chunk[1:-1]
        yield "]"

    atomic_write_parts(path, parts())


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


#: Where each time figure starts and stops; written into run.json next to the per-figure labels.
TIMING_SCOPE = {
    "started/finished": "run.json only: from the journal's start (after the model is converted or found in "
                        "the cache) to the last file written, evaluation included",
    "e2e window": "first shard dispatched to last shard result: excludes Ray start, worker start, model "
                  "conversion, merge, OKS-NMS and COCOeval",
    "device_seconds scope": "per backend call, timed inside the actor around the backend's run()",
    "phases_seconds": "the driver's wall seconds per phase of this batch size, in order, up to writing run.json: "
                      "model (conversion or cache), journal_and_shards, workers (start or switch), dispatch_window, "
                      "merge_and_records, oks_nms, parity (--check-backend), evaluation, write_keypoints, "
                      "write_metrics_throughput, report (timeline, analysis, report.html), write_run",
    "driver_peak_rss_mb": "the driver process's peak resident memory so far (MiB)",
}


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


class Laps:
    """Seconds between marks, by name: where a command's time goes (run.json's ``phases_seconds``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        """The time since the previous mark (or the start) was spent on ``name``."""
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
