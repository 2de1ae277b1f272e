"""Gathers shard results: one ordered set of keypoints, and throughput per device and in total.

The merge sorts by box id, so the output does not depend on how many devices
ran or in which order shards finished.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster.actor import ShardResult

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
}


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


def throughput(results: list[ShardResult], devices: list[dict], first_dispatch: float,
               last_result: float) -> dict:
    """``devices``: one dict per actor as ``Worker.describe`` gives it, plus ``lost``."""
    rows = []
    for d in devices:
        mine = [r for r in results if r.device == d["device"]]
        crops = sum(r.crops for r in mine)
        device_seconds = sum(r.device_seconds for r in mine)
        rows.append({
            "id": d["device"], "kind": d["kind"], "node": d.get("node", ""),
            "compute_device": d.get("compute_device", ""),
            "boxes": int(sum(len(r.box_ids) for r in mine)), "crops": int(crops),
            "device_seconds": device_seconds,
            "device_fps": crops / device_seconds if device_seconds > 0 else 0.0,
            "busy_seconds": sum(r.busy_seconds for r in mine),
            "wall_seconds": (max(r.finished for r in mine) - min(r.started for r in mine)) if mine else 0.0,
            "bytes_to_device": int(sum(r.bytes_to_device for r in mine)),
            "bytes_from_device": int(sum(r.bytes_from_device for r in mine)),
            "lost": bool(d.get("lost", False)),
        })
        rows[-1]["idle_seconds"] = max(0.0, rows[-1]["wall_seconds"] - rows[-1]["busy_seconds"])
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
    head = f"{'device':<10} {'kind':<5} {'node':<20} {'boxes':>7} {'crops':>7} {'dev s':>8} {'dev fps':>9} {'busy s':>8} {'wall s':>8}"
    lines = [head, "-" * len(head)]
    for r in tp["devices"]:
        lost = "  LOST" if r["lost"] else ""
        lines.append(f"{r['id']:<10} {r['kind']:<5} {_tail(r['node'], 20):<20} {r['boxes']:>7} {r['crops']:>7} "
                     f"{r['device_seconds']:>8.2f} {r['device_fps']:>9.1f} {r['busy_seconds']:>8.2f} "
                     f"{r['wall_seconds']:>8.2f}{lost}")
    t = tp["totals"]
    lines.append("-" * len(head))
    lines.append(f"sum of device fps (compute only): {t['sum_device_fps']:.1f} crops/s")
    lines.append(f"end to end over {t['wall_seconds']:.2f} s wall: {t['e2e_boxes_per_s']:.1f} boxes/s, "
                 f"{t['e2e_crops_per_s']:.1f} crops/s")
    if t.get("bytes_to_device_per_box"):
        idle = sum(r.get("idle_seconds", 0.0) for r in tp["devices"])
        lines.append(f"per box {t['bytes_to_device_per_box'] / 1024:.0f} KiB to the device, "
                     f"{t['bytes_from_device_per_box'] / 1024:.0f} KiB back; devices idle {idle:.2f} s in all")
    return "\n".join(lines)


def _tail(text: str, width: int) -> str:
    """The end of a long node name: its Ray node id prefix is what tells nodes apart."""
    return text if len(text) <= width else "…" + text[-(width - 1):]
