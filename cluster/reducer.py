"""Gathers shard results: one ordered set of keypoints, and throughput per device and in total.

The merge sorts by box id, so the output does not depend on how many devices
ran or in which order shards finished.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster.actor import HOST_STAGES, ShardResult

#: The distribution ``call_ms`` gives, and numpy's percentile method (linear interpolation
#: between the two nearest calls: numpy's default, the one ais_bench's and perf_analyzer's
#: nearest-rank figures approach as calls grow).
CALL_STATS = ("n", "min", "mean", "p50", "p90", "p99", "max")
PERCENTILE_METHOD = "linear"

#: What each throughput figure counts; written next to the figures.
LABELS = {
    "boxes": "person boxes whose keypoints were computed",
    "crops": "network inputs computed: 2 per box with flip test (padding excluded)",
    "device_seconds": "backend compute only (no preprocessing, decode or transfer between actors)",
    "device_fps": "crops per device second: what ais_bench calls throughput",
    "busy_seconds": "time the actor held its device: the backend calls (merge and decode run outside)",
    "wall_seconds": "actor's first shard start to last shard end",
    "idle_seconds": "wall_seconds - busy_seconds: the device had nothing to run (the host did not keep up)",
    "bytes_to_device_per_box": "input bytes handed to the backend per box, both flip passes (padding excluded)",
    "bytes_from_device_per_box": "heatmap bytes the backend returned per box",
    "node": "host/Ray node id prefix: simulated nodes share a host",
    "compute_device": "what the backend computes on inside the actor (a CPU backend may hold an NPU slot)",
    "lost": "the actor died or stopped answering during the run; its unfinished shards ran on the others",
    "lost_reason": "why the actor was declared lost (its error, or the seconds it held shards without a result)",
    "copies_won": "speculative copies this device ran whose result came first (its crops are counted here)",
    "speculative_copies": "shards also sent to an idle device because they were late (cluster.dispatch)",
    "speculative_copies_won": "of those, copies whose result came first; the other run of each was dropped",
    "failed_shards": "shards whose code raised on every try: their boxes are skipped (metrics.json)",
    "sum_device_fps": "sum of per-device device_fps (ais_bench's multi-device 'summary throughput')",
    "e2e_boxes_per_s": "all boxes / wall time from first dispatch to last result",
    "e2e_crops_per_s": "all crops / wall time from first dispatch to last result",
    "call_ms": ("device milliseconds per backend call over all of a device's calls (the seconds each "
                "backend.run returned: ais_bench's own per-call time for OM, the call's time otherwise; "
                f"warm-up excluded): n, min, mean, max and percentiles (numpy, method '{PERCENTILE_METHOD}')"),
    "host_seconds": ("host seconds per stage, summed over a device's batches (the worker's host processes and "
                     "its own threads each count theirs, so stages that overlap add up past the wall time)"),
    "host_seconds.read_decode": "host processes: reading and decoding the batch's images (cache hits cost ~0)",
    "host_seconds.crop": "host processes: center/scale, affine and warpAffine of each box's crop",
    "host_seconds.input": ("host processes: the network inputs from the crops (normalise, mirror for the flip "
                           "test), written into the batch's shared slot"),
    "host_seconds.flip_merge": "host processes: merging the two flip passes' heatmaps, read from the shared slot",
    "host_seconds.decode_keypoints": "host processes: heatmaps to keypoints in image pixels",
    "host_seconds.slot_wait": ("device thread: a batch next in line for a shared slot while none was free (every "
                               "slot in flight: the device or the host processes are behind)"),
    "host_seconds.prep_wait": ("device thread: idle with a shard in flight, before a batch's calls: waiting for "
                               "the host processes to finish inputs (the device idles meanwhile)"),
    "host_dominant": "the host work stage (not a wait) with the most seconds: the one to give more cores",
}

#: Stages that are work, not waiting: the candidates for ``host_dominant``.
WORK_STAGES = tuple(s for s in HOST_STAGES if not s.endswith("_wait"))


def call_ms(call_seconds: np.ndarray) -> dict:
    """The distribution of per-call device times, in milliseconds (CALL_STATS; zeros when no call)."""
    ms = np.asarray(call_seconds, np.float64) * 1e3
    if not len(ms):
        return dict.fromkeys(CALL_STATS, 0.0) | {"n": 0}
    p50, p90, p99 = np.percentile(ms, [50, 90, 99], method=PERCENTILE_METHOD)
    return {"n": int(len(ms)), "min": float(ms.min()), "mean": float(ms.mean()), "p50": float(p50),
            "p90": float(p90), "p99": float(p99), "max": float(ms.max())}


def host_seconds(results: list[ShardResult]) -> dict[str, float]:
    """Seconds per host stage summed over shards."""
    return {stage: float(sum(r.host_seconds[stage] for r in results)) for stage in HOST_STAGES}


def dominant_stage(stages: dict[str, float]) -> str | None:
    """The work stage with the most seconds (None when nothing was timed)."""
    work = {s: stages.get(s, 0.0) for s in WORK_STAGES}
    best = max(work, key=work.get)
    return best if work[best] > 0 else None


@dataclass
class Merged:
    box_ids: np.ndarray
    keypoints: np.ndarray
    crop_boxes: np.ndarray
    skipped: list[tuple[int, str]]


class DuplicateBoxError(RuntimeError):
    pass


def merge_shards(results: list[ShardResult]) -> Merged:
    ids = np.concatenate([r.box_ids for r in results]) if results else np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if len(ids) and np.any(ids[1:] == ids[:-1]):
        raise DuplicateBoxError(f"box {int(ids[1:][ids[1:] == ids[:-1]][0])} was computed twice")
    cat = (lambda name, shape: np.concatenate([getattr(r, name) for r in results])[order]
           if results else np.zeros(shape, np.float32))
    skipped = sorted(s for r in results for s in r.skipped)
    return Merged(ids, cat("keypoints", (0, 17, 3)), cat("crop_boxes", (0, 4)), skipped)


def device_rows(results: list, devices: list[dict], lost: dict[str, str] | None = None) -> list[tuple[dict, list]]:
    """Per worker, the figures every stage reports, and its results (pose or detector shards alike).

    ``devices``: one dict per worker as ``describe()`` gives it, named; ``lost``: the
    workers the queue dropped (else each dict's own ``lost``). A row: id, kind, node,
    compute_device, busy_seconds (holding the device), wall_seconds (first shard start
    to last shard end), idle_seconds, lost.
    """
    rows = []
    for d in devices:
        mine = [r for r in results if r.device == d["device"]]
        busy = sum(r.busy_seconds for r in mine)
        wall = (max(r.finished for r in mine) - min(r.started for r in mine)) if mine else 0.0
        gone = d["device"] in lost if lost is not None else bool(d.get("lost", False))
        rows.append(({"id": d["device"], "kind": d["kind"], "node": d.get("node", ""),
                      "compute_device": d.get("compute_device", ""), "busy_seconds": busy, "wall_seconds": wall,
                      "idle_seconds": max(0.0, wall - busy), "lost": gone}, mine))
    return rows


def throughput(results: list[ShardResult], devices: list[dict], first_dispatch: float,
               last_result: float) -> dict:
    """``devices``: one dict per actor as ``Worker.describe`` gives it, plus ``lost``."""
    rows = []
    for row, mine in device_rows(results, devices):
        crops = sum(r.crops for r in mine)
        device_seconds = sum(r.device_seconds for r in mine)
        row.update({
            "boxes": int(sum(len(r.box_ids) for r in mine)), "crops": int(crops), "device_seconds": device_seconds,
            "device_fps": crops / device_seconds if device_seconds > 0 else 0.0,
            "bytes_to_device": int(sum(r.bytes_to_device for r in mine)),
            "bytes_from_device": int(sum(r.bytes_from_device for r in mine)),
            "call_ms": call_ms(np.concatenate([r.call_seconds for r in mine]) if mine else np.zeros(0)),
            "host_seconds": host_seconds(mine),
        })
        row["host_dominant"] = dominant_stage(row["host_seconds"])
        rows.append(row)
    wall = max(last_result - first_dispatch, 1e-9)
    boxes = sum(r["boxes"] for r in rows)
    crops = sum(r["crops"] for r in rows)
    sent = sum(r["bytes_to_device"] for r in rows)
    back = sum(r["bytes_from_device"] for r in rows)
    totals = {"boxes": boxes, "crops": crops, "sum_device_fps": sum(r["device_fps"] for r in rows),
              "e2e_boxes_per_s": boxes / wall, "e2e_crops_per_s": crops / wall, "wall_seconds": wall,
              "bytes_to_device_per_box": sent / boxes if boxes else 0.0,
              "bytes_from_device_per_box": back / boxes if boxes else 0.0}
    return {"devices": rows, "totals": totals, "labels": LABELS}


def format_throughput(tp: dict) -> str:
    """The throughput table as the terminal shows it."""
    head = (f"{'device':<10} {'kind':<5} {'node':<20} {'boxes':>7} {'crops':>7} {'dev s':>8} {'dev fps':>9} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'busy s':>8} {'wall s':>8}")
    lines = [head, "-" * len(head)]
    for r in tp["devices"]:
        lost = "  LOST" if r["lost"] else ""
        calls = r["call_ms"]
        lines.append(f"{r['id']:<10} {r['kind']:<5} {_tail(r['node'], 20):<20} {r['boxes']:>7} {r['crops']:>7} "
                     f"{r['device_seconds']:>8.2f} {r['device_fps']:>9.1f} {_ms(calls, 'p50')} {_ms(calls, 'p99')} "
                     f"{r['busy_seconds']:>8.2f} {r['wall_seconds']:>8.2f}{lost}")
    t = tp["totals"]
    lines.append("-" * len(head))
    lines.append(f"sum of device fps (compute only): {t['sum_device_fps']:.1f} crops/s")
    lines.append(f"end to end over {t['wall_seconds']:.2f} s wall: {t['e2e_boxes_per_s']:.1f} boxes/s, "
                 f"{t['e2e_crops_per_s']:.1f} crops/s")
    if t.get("bytes_to_device_per_box"):
        idle = sum(r.get("idle_seconds", 0.0) for r in tp["devices"])
        lines.append(f"per box {t['bytes_to_device_per_box'] / 1024:.0f} KiB to the device, "
                     f"{t['bytes_from_device_per_box'] / 1024:.0f} KiB back; devices idle {idle:.2f} s in all")
    if (host := format_host_stages(tp["devices"])):
        lines.append(host)
    return "\n".join(lines)


def _ms(calls: dict, key: str) -> str:
    return f"{calls[key]:>8.2f}" if calls.get("n") else f"{'-':>8}"


def format_host_stages(devices: list[dict]) -> str | None:
    """One line: the dominant host work stage over all devices, with its seconds and the runner-up."""
    total = dict.fromkeys(HOST_STAGES, 0.0)
    for d in devices:
        for stage, s in (d.get("host_seconds") or {}).items():
            total[stage] = total.get(stage, 0.0) + s
    top = dominant_stage(total)
    if top is None:
        return None
    work = sorted(((total[s], s) for s in WORK_STAGES), reverse=True)
    share = total[top] / sum(s for s, _ in work)
    rest = ", ".join(f"{name} {s:.2f}" for s, name in work[1:3])
    return (f"host time is dominated by {top}: {total[top]:.2f} s ({share:.0%} of host work; next {rest}; "
            f"the device waited for inputs {total.get('prep_wait', 0.0):.2f} s)")


def _tail(text: str, width: int) -> str:
    """The end of a long node name: its Ray node id prefix is what tells nodes apart."""
    return text if len(text) <= width else "…" + text[-(width - 1):]
