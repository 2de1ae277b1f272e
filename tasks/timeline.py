"""OUT/timeline.json: a run's shards, backend calls and events in Chrome's trace-event format.

Opens in Perfetto (ui.perfetto.dev) and chrome://tracing. Built from plain records of wall
times in seconds (``time.time()``), so it needs nothing of the run but those records.

Layout: one process per device, named ``"npu:0 @ 10.0.0.2"`` (the device as the throughput
table names it, at its node), ordered as given. Inside it a thread ``calls`` holds one
complete event per backend call, and threads ``shards`` (``shards 2``, ... when shards of
one device overlap in time, as a trace-event thread must nest) hold one complete event per
shard. Markers (a device lost, a copy sent, the queue empty) are instant events on their
device, or on a ``run`` process when they belong to no device. Timestamps are microseconds
from the run start; ``otherData.run_start_unix_s`` keeps that start so a resumed run can
read its earlier shards back (``records_from_timeline``) and write them again.

Format: "Trace Event Format" (Google, docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MARKER_KINDS = ("device_lost", "copy_sent", "queue_empty")
RUN_PID = 0
CALLS_TID = 1
FIRST_SHARD_TID = 2


@dataclass(frozen=True)
class ShardSpan:
    """One shard as a device computed it. ``copy``: a speculative duplicate; ``won``: its result was kept."""

    device: str
    node: str
    shard: int
    boxes: int
    start: float  # unix seconds
    end: float
    copy: bool = False
    won: bool = True


@dataclass(frozen=True)
class CallSpan:
    """One backend call (a batch through the model)."""

    device: str
    node: str
    start: float  # unix seconds
    duration: float  # seconds
    shard: int | None = None
    size: int | None = None  # crops in the call


@dataclass(frozen=True)
class Marker:
    """Something that happened at one moment: ``kind`` in ``MARKER_KINDS``, ``text`` for people."""

    time: float  # unix seconds
    kind: str
    text: str
    device: str | None = None
    node: str | None = None


@dataclass
class TimelineRecords:
    shards: list[ShardSpan] = field(default_factory=list)
    calls: list[CallSpan] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)


def track_name(device: str, node: str) -> str:
    """The name of a device's track: the device as the throughput table names it, at its node."""
    return f"{device} @ {node}"


def _us(t: float, start: float) -> float:
    # Rounded to the nanosecond: shorter JSON, and far below anything a trace viewer shows.
    return round((t - start) * 1e6, 3)


def _tracks(records: TimelineRecords, devices: Sequence[tuple[str, str]] | None) -> dict[tuple[str, str], int]:
    """(device, node) -> pid, in the order given, then any other device in order of appearance."""
    keys = list(devices or [])
    for r in [*records.shards, *records.calls, *records.markers]:
        if r.device is not None and (r.device, r.node) not in keys:
            keys.append((r.device, r.node))
    return {key: pid for pid, key in enumerate(keys, start=1)}


def lanes(spans: Sequence[tuple[float, float]]) -> list[int]:
    """A lane index per span (start, end) such that spans in one lane do not overlap; fewest lanes greedily."""
    lane_end: list[float] = []
    out = [0] * len(spans)
    for i in sorted(range(len(spans)), key=lambda i: (spans[i][0], spans[i][1])):
        start, end = spans[i]
        free = next((k for k, e in enumerate(lane_end) if e <= start), None)
        if free is None:
            free = len(lane_end)
            lane_end.append(end)
        lane_end[free] = end
        out[i] = free
    return out


def _metadata(pid: int, name: str, sort_index: int, threads: dict[int, str]) -> list[dict]:
    events = [{"ph": "M", "pid": pid, "tid": 0, "name": "process_name", "args": {"name": name}},
              {"ph": "M", "pid": pid, "tid": 0, "name": "process_sort_index", "args": {"sort_index": sort_index}}]
    for tid, thread in threads.items():
        events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": thread}})
        events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})
    return events


def _shard_events(shards: Sequence[ShardSpan], pids: dict, start: float) -> tuple[list[dict], dict]:
    """X events of the shards, and the shard lanes each device needed."""
    events: list[dict] = []
    lanes_of: dict[int, int] = {}
    for key, pid in pids.items():
        mine = [s for s in shards if (s.device, s.node) == key]
        lane = lanes([(s.start, s.end) for s in mine])
        lanes_of[pid] = max(lane, default=-1) + 1
        for s, k in zip(mine, lane):
            name = f"shard {s.shard}" + (" (copy)" if s.copy else "") + ("" if s.won else " lost")
            events.append({"ph": "X", "cat": "shard", "name": name, "pid": pid, "tid": FIRST_SHARD_TID + k,
                           "ts": _us(s.start, start), "dur": _us(max(s.end, s.start), s.start),
                           "args": {"shard": s.shard, "boxes": s.boxes, "copy": s.copy, "won": s.won}})
    return events, lanes_of


def _call_events(calls: Sequence[CallSpan], pids: dict, start: float) -> list[dict]:
    events = []
    for c in calls:
        args = {k: v for k, v in (("shard", c.shard), ("size", c.size)) if v is not None}
        events.append({"ph": "X", "cat": "call", "name": "call", "pid": pids[(c.device, c.node)], "tid": CALLS_TID,
                       "ts": _us(c.start, start), "dur": _us(c.start + max(c.duration, 0.0), c.start),
                       "args": args})
    return events


def _marker_events(markers: Sequence[Marker], pids: dict, start: float) -> list[dict]:
    events = []
    for m in markers:
        on_device = m.device is not None
        events.append({"ph": "i", "cat": "marker", "name": m.text, "s": "p" if on_device else "g",
                       "pid": pids[(m.device, m.node)] if on_device else RUN_PID,
                       "tid": FIRST_SHARD_TID if on_device else 0, "ts": _us(m.time, start),
                       "args": {"kind": m.kind}})
    return events


def build_timeline(shards: Iterable[ShardSpan], calls: Iterable[CallSpan] = (), markers: Iterable[Marker] = (),
                   run_start: float | None = None, devices: Sequence[tuple[str, str]] | None = None,
                   other: dict | None = None) -> dict:
    """The trace object to dump as timeline.json.

    ``devices``: (device, node) in the table's order (others follow as they appear);
    ``run_start``: unix seconds of time 0 (default: the earliest record); ``other``: extra
    fields for ``otherData`` (e.g. the batch size).
    """
    records = TimelineRecords(list(shards), list(calls), list(markers))
    for m in records.markers:
        if m.kind not in MARKER_KINDS:
            raise ValueError(f"marker kind {m.kind!r}: use one of {', '.join(MARKER_KINDS)}")
    times = ([s.start for s in records.shards] + [c.start for c in records.calls]
             + [m.time for m in records.markers])
    start = run_start if run_start is not None else min(times, default=0.0)
    pids = _tracks(records, devices)
    shard_events, lanes_of = _shard_events(records.shards, pids, start)
    events: list[dict] = []
    for (device, node), pid in pids.items():
        threads = {CALLS_TID: "calls"}
        threads.update({FIRST_SHARD_TID + k: "shards" + (f" {k + 1}" if k else "")
                        for k in range(max(lanes_of[pid], 1))})
        events += _metadata(pid, track_name(device, node), pid, threads)
    if any(m.device is None for m in records.markers):
        events += _metadata(RUN_PID, "run", 0, {})
    events += shard_events + _call_events(records.calls, pids, start) + _marker_events(records.markers, pids, start)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"run_start_unix_s": start, **(other or {})}}


def _devices_by_pid(trace: dict) -> dict[int, tuple[str, str]]:
    """pid -> (device, node) from the process names ``track_name`` wrote."""
    out = {}
    for e in trace["traceEvents"]:
        if e.get("ph") == "M" and e.get("name") == "process_name" and e["pid"] != RUN_PID:
            device, _, node = e["args"]["name"].rpartition(" @ ")
            out[e["pid"]] = (device, node)
    return out


def records_from_timeline(trace: dict) -> TimelineRecords:
    """The records a timeline was built from (times back in unix seconds), for a resumed run
    to keep the shards of its earlier part: ``build_timeline(old.shards + new_shards, ...)``."""
    start = float(trace.get("otherData", {}).get("run_start_unix_s", 0.0))
    devices = _devices_by_pid(trace)
    out = TimelineRecords()
    for e in trace["traceEvents"]:
        t = start + e.get("ts", 0.0) / 1e6
        if e.get("ph") == "X" and e.get("cat") == "shard":
            a = e["args"]
            out.shards.append(ShardSpan(*devices[e["pid"]], a["shard"], a["boxes"], t, t + e["dur"] / 1e6,
                                        a["copy"], a["won"]))
        elif e.get("ph") == "X" and e.get("cat") == "call":
            a = e.get("args", {})
            out.calls.append(CallSpan(*devices[e["pid"]], t, e["dur"] / 1e6, a.get("shard"), a.get("size")))
        elif e.get("ph") == "i":
            device, node = devices.get(e["pid"], (None, None)) if e.get("s") == "p" else (None, None)
            out.markers.append(Marker(t, e["args"]["kind"], e["name"], device, node))
    return out


def winning_boxes(trace: dict) -> int:
    """Boxes of the shards whose result was kept: the run's boxes, each counted once."""
    return sum(e["args"]["boxes"] for e in trace["traceEvents"]
               if e.get("ph") == "X" and e.get("cat") == "shard" and e["args"]["won"])
