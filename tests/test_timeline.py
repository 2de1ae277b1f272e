"""timeline.json in Chrome's trace-event format (tasks.timeline)."""
from __future__ import annotations

import json

import pytest

from tasks.timeline import (CallSpan, Marker, ShardSpan, build_timeline, lanes, records_from_timeline, track_name,
                            winning_boxes)

T0 = 1_760_000_000.0  # a run's start in unix seconds
NODE = "10.0.0.7"


def run_records():
    """Two NPUs: npu:0 computes shards 0, 2 (overlapping) and a copy of 3 that loses; npu:1 shards 1, 3."""
    shards = [ShardSpan("npu:0", NODE, 0, 64, T0 + 1.0, T0 + 3.0),
              ShardSpan("npu:1", NODE, 1, 64, T0 + 1.1, T0 + 3.2),
              ShardSpan("npu:0", NODE, 2, 64, T0 + 2.5, T0 + 4.0),
              ShardSpan("npu:1", NODE, 3, 30, T0 + 3.3, T0 + 6.0),
              ShardSpan("npu:0", NODE, 3, 30, T0 + 4.5, T0 + 5.5, copy=True, won=False)]
    calls = [CallSpan("npu:0", NODE, T0 + 1.2 + 0.1 * k, 0.05, 0, 16) for k in range(4)]
    calls.append(CallSpan("npu:1", NODE, T0 + 1.3, 0.5))
    markers = [Marker(T0 + 4.5, "copy_sent", "copy of shard 3 sent to npu:0", "npu:0", NODE),
               Marker(T0 + 5.0, "device_lost", "npu:2 lost", "npu:2", "10.0.0.8"),
               Marker(T0 + 6.0, "queue_empty", "queue empty")]
    return shards, calls, markers


def events(trace: dict, ph: str, cat: str | None = None) -> list[dict]:
    return [e for e in trace["traceEvents"] if e["ph"] == ph and (cat is None or e.get("cat") == cat)]


def process_names(trace: dict) -> dict[int, str]:
    return {e["pid"]: e["args"]["name"] for e in events(trace, "M") if e["name"] == "process_name"}


def test_structure_is_chromes_trace_event_format():
    shards, calls, markers = run_records()
    trace = build_timeline(shards, calls, markers, run_start=T0, devices=[("npu:1", NODE), ("npu:0", NODE)],
                           other={"bs": 16})
    json.dumps(trace, allow_nan=False)
    assert trace["displayTimeUnit"] == "ms"
    assert trace["otherData"] == {"run_start_unix_s": T0, "bs": 16}
    # One track (process) per device, named as in the table at its node, in the order given.
    assert process_names(trace) == {1: "npu:1 @ 10.0.0.7", 2: "npu:0 @ 10.0.0.7", 3: "npu:2 @ 10.0.0.8", 0: "run"}
    for e in trace["traceEvents"]:
        assert {"ph", "pid", "tid", "name"} <= set(e)
        if e["ph"] == "X":
            assert e["ts"] >= 0 and e["dur"] >= 0
    shard_events = events(trace, "X", "shard")
    assert len(shard_events) == 5
    first = next(e for e in shard_events if e["args"]["shard"] == 0)
    assert first["ts"] == pytest.approx(1e6) and first["dur"] == pytest.approx(2e6)  # microseconds from T0
    assert first["pid"] == 2 and set(first["args"]) == {"shard", "boxes", "copy", "won"}
    lost = next(e for e in shard_events if not e["args"]["won"])
    assert lost["args"] == {"shard": 3, "boxes": 30, "copy": True, "won": False} and lost["pid"] == 2
    call_events = events(trace, "X", "call")
    assert len(call_events) == 5 and {e["tid"] for e in call_events} == {1}
    assert call_events[0]["dur"] == pytest.approx(5e4) and call_events[0]["args"] == {"shard": 0, "size": 16}
    instants = events(trace, "i")
    assert [(e["name"], e["s"], e["pid"]) for e in instants] == [
        ("copy of shard 3 sent to npu:0", "p", 2), ("npu:2 lost", "p", 3), ("queue empty", "g", 0)]
    assert [e["args"]["kind"] for e in instants] == ["copy_sent", "device_lost", "queue_empty"]


def test_winning_shards_hold_every_box_once():
    shards, calls, markers = run_records()
    trace = build_timeline(shards, calls, markers)
    total = 64 + 64 + 64 + 30
    assert winning_boxes(trace) == total
    assert sum(e["args"]["boxes"] for e in events(trace, "X", "shard")) == total + 30  # the lost copy


def test_overlapping_shards_of_a_device_get_their_own_lane():
    shards, calls, markers = run_records()
    trace = build_timeline(shards, calls, markers, run_start=T0)
    npu0 = next(pid for pid, name in process_names(trace).items() if name.startswith("npu:0"))
    tid_of = {e["args"]["shard"]: e["tid"] for e in events(trace, "X", "shard") if e["pid"] == npu0}
    assert tid_of[0] != tid_of[2]  # 0 runs 1.0-3.0 s, 2 runs 2.5-4.0 s
    assert tid_of[3] == tid_of[0]  # the copy starts at 4.5 s, after 0 ended
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events(trace, "M") if e["name"] == "thread_name"}
    assert threads[(npu0, 1)] == "calls" and threads[(npu0, tid_of[0])] == "shards"
    assert threads[(npu0, tid_of[2])] == "shards 2"
    # Events on one thread never overlap: what trace viewers need to nest them.
    for (pid, tid) in threads:
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events(trace, "X") if (e["pid"], e["tid"]) == (pid, tid))
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_lanes_are_few_and_disjoint():
    assert lanes([(0, 2), (1, 3), (2, 4), (3, 5)]) == [0, 1, 0, 1]
    assert lanes([(5, 6), (0, 1)]) == [0, 0]
    assert lanes([]) == []


def test_resumed_run_keeps_the_earlier_shards():
    shards, calls, markers = run_records()
    earlier = json.loads(json.dumps(build_timeline(shards[:2], calls, markers[:1])))
    restored = records_from_timeline(earlier)
    assert [(s.device, s.node, s.shard, s.boxes, s.copy, s.won) for s in restored.shards] == \
        [(s.device, s.node, s.shard, s.boxes, s.copy, s.won) for s in shards[:2]]
    assert [s.start for s in restored.shards] == pytest.approx([s.start for s in shards[:2]], abs=1e-6)
    assert [c.duration for c in restored.calls] == pytest.approx([c.duration for c in calls], abs=1e-6)
    assert restored.markers[0].device == "npu:0" and restored.markers[0].kind == "copy_sent"
    later = shards[2:]
    both = build_timeline(restored.shards + later, restored.calls, restored.markers)
    assert sorted(e["args"]["shard"] for e in events(both, "X", "shard")) == [0, 1, 2, 3, 3]
    assert winning_boxes(both) == 64 + 64 + 64 + 30


def test_unknown_marker_kind_is_refused_and_names_are_the_tables():
    with pytest.raises(ValueError, match="marker kind"):
        build_timeline([], markers=[Marker(T0, "oops", "?")])
    assert track_name("cuda:1", "gpu-node") == "cuda:1 @ gpu-node"
    assert build_timeline([])["traceEvents"] == []
