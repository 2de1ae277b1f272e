"""Tables and plots from saved runs: a sweep's summary, and runs compared side by side.

Everything here reads the files a run wrote (``run.json``, ``metrics.json``,
``throughput.json``), so ``python -m runner report OUT`` redraws what the run drew.
A run directory holds those files; a sweep directory holds one ``bs{N}/`` per batch size.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from tasks.compare import compare_results
from tasks.errors import UserError
from tasks.files import atomic_file, atomic_write_text
from tasks.keypoint_errors import ERROR_CLASSES, KEYPOINT_NAMES, diff_analyses


class ReportError(UserError, ValueError):
    """A directory that holds no saved run; one line for the user."""


@dataclass
class SavedRun:
    dir: Path
    bs: int
    backend: str
    model: str
    metrics: dict
    throughput: dict
    phases: dict  # run.json's phases_seconds: the driver's seconds per phase
    precision: str | None = None  # an OM's ATC precision mode (run.json's plan); None for other backends


def outside_window(phases: dict) -> float | None:
    """The driver's seconds of a batch size outside its dispatch window (None: not recorded)."""
    return sum(phases.values()) - phases.get("dispatch_window", 0.0) if phases else None


def load_run(path: Path) -> SavedRun:
    run = json.loads((path / "run.json").read_text())
    bs = run.get("bs") or run["config"]["bs"][0]
    model = run.get("model", {}).get("name", "FastPose ResNet-50 256x192")
    return SavedRun(path, int(bs), run["backend"], model, json.loads((path / "metrics.json").read_text()),
                    json.loads((path / "throughput.json").read_text()), run["phases_seconds"],
                    run["plan"].get("precision_mode"))


def load_runs(path: str | Path) -> list[SavedRun]:
    """The runs in a run directory (one) or a sweep directory (one per ``bs{N}/``), by batch size."""
    path = Path(path)
    if (path / "run.json").exists():
        return [load_run(path)]
    runs = [load_run(d) for d in path.glob("bs*") if (d / "run.json").exists()]
    if not runs:
        raise ReportError(f"{path}: no saved run (run.json) here or in its bs*/ directories")
    return sorted(runs, key=lambda r: (r.precision or "", r.bs))


def _map(run: SavedRun) -> float | None:
    return run.metrics["AP"] if run.metrics.get("evaluated") else None


def summary_rows(runs: list[SavedRun]) -> list[dict]:
    """One row per run in the reference's shape: model, bs, mAP, fps per device, sums, end to end."""
    rows = []
    for r in runs:
        t = r.throughput["totals"]
        rows.append({"model": r.model, "backend": r.backend, "precision": r.precision, "bs": r.bs, "mAP": _map(r),
                     "device_fps": {d["id"]: d["device_fps"] for d in r.throughput["devices"]},
                     "device_crops": {d["id"]: d["crops"] for d in r.throughput["devices"]},
                     "sum_device_fps": t["sum_device_fps"], "e2e_boxes_per_s": t["e2e_boxes_per_s"],
                     "e2e_crops_per_s": t["e2e_crops_per_s"], "complete": r.metrics.get("complete", True),
                     "outside_window_s": outside_window(r.phases), "dir": str(r.dir)})
    return rows


def _device_ids(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(d for row in rows for d in row["device_fps"]))


def _fmt_map(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def precisions(rows: list[dict]) -> list[str | None]:
    """The precision modes of a summary's rows, in order; [None] when no row is an OM's."""
    return list(dict.fromkeys(row["precision"] for row in rows))


def table_columns(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The summary table; a ``precision`` column when the rows are of several precision modes."""
    devices = _device_ids(rows)
    several = len(precisions(rows)) > 1
    head = ["model", "backend", *(["precision"] if several else []), "bs", "mAP", *[f"{d} fps" for d in devices],
            "sum device fps", "e2e boxes/s", "e2e crops/s", "outside window s"]
    body = []
    for row in rows:
        fps = [f"{row['device_fps'][d]:.1f}" if row["device_crops"].get(d) else "-" for d in devices]
        body.append([row["model"], row["backend"], *([row["precision"]] if several else []), str(row["bs"]),
                     _fmt_map(row["mAP"]), *fps,
                     f"{row['sum_device_fps']:.1f}", f"{row['e2e_boxes_per_s']:.1f}", f"{row['e2e_crops_per_s']:.1f}",
                     "-" if row["outside_window_s"] is None else f"{row['outside_window_s']:.1f}"])
    return head, body


def format_markdown(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def format_table(head: list[str], body: list[list[str]]) -> str:
    """The same table aligned for a terminal."""
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), "-" * len(line(head)), *[line(r) for r in body]])


SCOPE_NOTE = ("device fps: crops per second of backend compute (2 crops per box with flip test); sum: their sum "
              "over devices; e2e: all boxes or crops over the wall time from first dispatch to last result")


#: The knee's tolerance: a batch size within this fraction of the sweep's best end-to-end crops/s.
KNEE_TOLERANCE = 0.05


def knee(rows: list[dict], tolerance: float = KNEE_TOLERANCE) -> dict | None:
    """The smallest batch size whose end-to-end crops/s is within ``tolerance`` of the sweep's best.

    Past it a larger batch buys (almost) nothing but latency and memory, so it is the
    batch size to pick. Ties go to the smaller batch size; None for no rows.
    """
    if not rows:
        return None
    best = max(rows, key=lambda r: (r["e2e_crops_per_s"], -r["bs"]))
    floor = (1 - tolerance) * best["e2e_crops_per_s"]
    chosen = min((r for r in rows if r["e2e_crops_per_s"] >= floor), key=lambda r: r["bs"])
    return {"bs": chosen["bs"], "e2e_crops_per_s": chosen["e2e_crops_per_s"], "best_bs": best["bs"],
            "best_e2e_crops_per_s": best["e2e_crops_per_s"], "tolerance": tolerance}


def knee_line(point: dict | None) -> str:
    if point is None:
        return "knee: n/a (no runs)"
    return (f"knee: bs {point['bs']} ({point['e2e_crops_per_s']:.1f} e2e crops/s, within "
            f"{point['tolerance']:.0%} of the best, {point['best_e2e_crops_per_s']:.1f} at bs {point['best_bs']})")


def write_summary(out: Path, runs: list[SavedRun]) -> str:
    """``summary.md``, ``summary.csv``, ``summary.json`` and ``throughput.png`` in ``out``; returns the table."""
    order = {p: k for k, p in enumerate(dict.fromkeys(r.precision for r in runs))}
    rows = summary_rows(sorted(runs, key=lambda r: (order[r.precision], r.bs)))
    head, body = table_columns(rows)
    knees = {p: knee([r for r in rows if r["precision"] == p]) for p in precisions(rows)}
    point = next(iter(knees.values()))
    lines = "\n".join(knee_line(k) + (f" ({p})" if len(knees) > 1 else "") for p, k in knees.items())
    atomic_write_text(out / "summary.md", format_markdown(head, body) + f"\n\n{lines}\n\n{SCOPE_NOTE}\n")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([head, *body])
    atomic_write_text(out / "summary.csv", buf.getvalue())
    by_mode = {"knee_by_precision": knees} if len(knees) > 1 else {}
    atomic_write_text(out / "summary.json", json.dumps({"rows": rows, "knee": point, **by_mode, "scope": SCOPE_NOTE},
                                                       indent=1))
    plot_throughput(rows, out / "throughput.png")
    return format_table(head, body) + "\n" + lines


#: throughput.png's size in pixels (width, height): figsize times dpi, no tight bounding box.
PLOT_SIZE = (900, 540)
_DPI = 100


def device_points(rows: list[dict], device: str) -> tuple[list[int], list[float]]:
    """A device's fps at every batch size of the sweep; 0 where it computed nothing (lost, or no shard)."""
    return ([row["bs"] for row in rows],
            [row["device_fps"].get(device, 0.0) if row["device_crops"].get(device) else 0.0 for row in rows])


def throughput_figure(rows: list[dict]):
    """The plot as a matplotlib Figure (the caller closes it): what ``plot_throughput`` saves.

    The y axis starts at 0 so a few percent look like a few percent, and batch sizes
    sit on a log2 axis, where a sweep's doublings are evenly spaced.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(PLOT_SIZE[0] / _DPI, PLOT_SIZE[1] / _DPI), dpi=_DPI)
    modes = precisions(rows)
    for k, mode in enumerate(modes):  # several precision modes: a set of lines each, the mode in the legend
        _plot_lines(ax, [r for r in rows if r["precision"] == mode], f" ({mode})" if len(modes) > 1 else "",
                    ("-", "-.", ":", (0, (5, 1)))[k % 4])
    bs = sorted({row["bs"] for row in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size")
    ax.set_ylabel("crops per second")
    ax.set_title(f"{rows[0]['model']} ({rows[0]['backend']})" if rows else "throughput")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _plot_lines(ax, rows: list[dict], suffix: str, style) -> None:
    """One precision mode's lines: each device, their sum with mAP at each point, end to end, the knee."""
    bs = [row["bs"] for row in rows]
    for d in _device_ids(rows):
        ax.plot(*device_points(rows, d), marker="o", linestyle=style, label=f"{d} device fps{suffix}")
    total = [row["sum_device_fps"] for row in rows]
    ax.plot(bs, total, marker="s", linewidth=2, color="black", linestyle=style, label=f"sum of device fps{suffix}")
    ax.plot(bs, [row["e2e_crops_per_s"] for row in rows], marker="^", linestyle="--", color="gray",
            label=f"end to end crops/s{suffix}")
    for x, y, row in zip(bs, total, rows):
        ax.annotate(f"mAP {_fmt_map(row['mAP'])}", (x, y), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=8)
    point = knee(rows)
    if point is not None:
        ax.axvline(point["bs"], color="tab:red", linestyle=":", label=f"knee: bs {point['bs']}{suffix}")


def plot_throughput(rows: list[dict], path: Path) -> None:
    """Throughput against batch size: one line per device and the total, mAP at each total point, the knee."""
    import matplotlib.pyplot as plt

    fig = throughput_figure(rows)
    try:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format="png", dpi=_DPI)
    finally:
        plt.close(fig)


def compare(base: list[SavedRun], other: list[SavedRun]) -> list[dict]:
    """Per batch size in both: mAP difference (other - base) and throughput ratios (other / base)."""
    by_bs = {r.bs: r for r in base}
    rows = []
    for r in other:
        b = by_bs.get(r.bs)
        if b is None:
            continue
        bt, ot = b.throughput["totals"], r.throughput["totals"]
        ratio = lambda key: ot[key] / bt[key] if bt[key] else float("nan")
        rows.append({"bs": r.bs, "mAP_base": _map(b), "mAP_other": _map(r),
                     "mAP_diff": None if _map(b) is None or _map(r) is None else _map(r) - _map(b),
                     "sum_device_fps_ratio": ratio("sum_device_fps"),
                     "e2e_boxes_per_s_ratio": ratio("e2e_boxes_per_s"),
                     "e2e_crops_per_s_ratio": ratio("e2e_crops_per_s"),
                     "keypoints": keypoint_comparison(b, r), "keypoint_errors": keypoint_error_comparison(b, r)})
    return rows


def keypoint_error_comparison(base: SavedRun, other: SavedRun) -> dict | None:
    """Per joint, other - base of the coco-analyze error classes (``tasks.keypoint_errors.diff_analyses``);
    None unless both runs wrote an analysis.json."""
    a, b = base.dir / "analysis.json", other.dir / "analysis.json"
    if not (a.is_file() and b.is_file()):
        return None
    return diff_analyses(json.loads(a.read_text()), json.loads(b.read_text()))


def format_keypoint_errors(rows: list[dict]) -> str | None:
    """Per batch size with both analyses: per joint the change of each error class's share (points of
    percent, other - base) and of the median error in pixels."""
    parts = []
    for r in rows:
        diff = r.get("keypoint_errors")
        if diff is None:
            continue
        head = ["joint", *[f"{c} %" for c in ERROR_CLASSES], "median px"]
        body = [[name, *[_fig(None if (v := diff["joints"][name][f"{c}_fraction"]) is None else 100 * v, "+.1f")
                         for c in ERROR_CLASSES], _fig(diff["joints"][name]["median_error_px"], "+.2f")]
                for name in KEYPOINT_NAMES]
        parts.append(f"bs {r['bs']}: per joint, other - base (coco-analyze classes, share of the joints):\n"
                     + format_table(head, body))
    return "\n".join(parts) or None


def keypoint_comparison(base: SavedRun, other: SavedRun) -> dict | None:
    """The two runs' keypoints.json compared box by box (tasks.compare), other against base;
    None when either run has none. Read here, not in load_run: a full set's file is large and
    only a comparison needs it."""
    a, b = base.dir / "keypoints.json", other.dir / "keypoints.json"
    if not (a.is_file() and b.is_file()):
        return None
    return compare_results(json.loads(a.read_text()), json.loads(b.read_text())).as_dict()


def _fig(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_keypoint_compare(rows: list[dict]) -> str | None:
    """The box-by-box keypoint figures per batch size, for the rows that have them."""
    head = ["bs", "matched", "unmatched base", "unmatched other", "max |dxy| px", "<=1e-3px", "<=0.5px",
            "max |dscore|", "mean OKS"]
    body = [[str(r["bs"]), str(k["matched"]), str(k["unmatched_a"]), str(k["unmatched_b"]),
             _fig(k["max_abs_px"], ".3g"), _fig(k["frac_within_1e-3px"], ".4f"), _fig(k["frac_within_0.5px"], ".4f"),
             _fig(k["max_abs_score"], ".3g"), _fig(k["mean_oks"], ".6f")]
            for r in rows if (k := r.get("keypoints")) is not None]
    if not body:
        return None
    return ("keypoints box by box (matched on image id and detection box; fractions of joints whose "
            "max(|dx|, |dy|) is within):\n" + format_table(head, body))


def format_compare(base_name: str, other_name: str, rows: list[dict]) -> str:
    head = ["bs", "mAP base", "mAP other", "mAP diff", "device fps ratio", "e2e boxes/s ratio"]
    body = [[str(r["bs"]), _fmt_map(r["mAP_base"]), _fmt_map(r["mAP_other"]),
             "n/a" if r["mAP_diff"] is None else f"{r['mAP_diff']:+.4f}",
             f"{r['sum_device_fps_ratio']:.3f}", f"{r['e2e_boxes_per_s_ratio']:.3f}"] for r in rows]
    if not body:
        return f"{other_name} vs {base_name}: no batch size in common"
    text = f"{other_name} vs {base_name} (other / base):\n" + format_table(head, body)
    extra = [t for t in (format_keypoint_compare(rows), format_keypoint_errors(rows)) if t is not None]
    return "\n".join([text, *extra])


def _name(path: str, runs: list[SavedRun]) -> str:
    return f"{Path(path).name} [{runs[0].backend}, {len(runs[0].throughput['devices'])} devices]"


def report(dirs: list[str], log=print) -> list[list[dict]]:
    """Re-render each directory's summary (files and table); compare every further one with the first."""
    loaded = [load_runs(d) for d in dirs]
    for d, runs in zip(dirs, loaded):
        log(f"{d}:")
        log(write_summary(Path(d), runs))
    comparisons = []
    for d, runs in zip(dirs[1:], loaded[1:]):
        rows = compare(loaded[0], runs)
        comparisons.append(rows)
        log(format_compare(_name(dirs[0], loaded[0]), _name(d, runs), rows))
        # beside the compared run's summary files: this directory against the base
        atomic_write_text(Path(d) / COMPARISON_FILE,
                          json.dumps({"base": str(dirs[0]), "other": str(d), "rows": rows}, indent=1))
    return comparisons


#: What ``report`` writes into each further directory: its comparison with the first.
COMPARISON_FILE = "comparison.json"
