"""Per-call device latency (``call_ms``) and host seconds per stage (``host_seconds``) in throughput.json.

The sim device's per-call time is known: crops in the call / sim rate (tasks/backends/sim.py).
A worker runs in-process (no Ray) with two shards at once, as the actor's two in-flight
shards run, so the thread bound on the stages' seconds is the real one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cluster.actor import HOST_STAGES, POST_STAGES, PREP_STAGES, Shard, ShardResult, Worker, WorkerConfig
from cluster.queue import IN_FLIGHT_PER_WORKER
from cluster.worker import WorkerPlace
from cluster.reducer import LABELS, call_ms, format_throughput, throughput
from conftest import REPO
from runner.journal import Journal
from tasks.dataset import load_boxes

BS, RATE, PREP = 4, 100.0, 2  # 40 ms per call of 4 crops: long against sleep's overshoot on a busy host


@pytest.fixture(scope="module")
def shards(synthetic_coco) -> list[Shard]:
    box_set = load_boxes(synthetic_coco["dataroot"], synthetic_coco["dets"])
    boxes = box_set.boxes[:16]
    assert len(boxes) == 16
    return [Shard(k, boxes[k * 8:(k + 1) * 8], box_set.image_paths) for k in range(2)]


@pytest.fixture(scope="module")
def sim_run(shards) -> tuple[list[ShardResult], dict]:
    """Two shards run at once on one sim worker; their results and the reducer's throughput."""
    place = WorkerPlace(backend="sim", compute_device="cpu", label="sim:0", kind="cpu", threads=1)
    worker = Worker(WorkerConfig(place=place, model_path="", batch_size=BS, host_processes=PREP, sim_rate=RATE))
    results: list[ShardResult] = [None, None]
    try:
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, worker.run_shard(shards[k])))
                   for k in range(IN_FLIGHT_PER_WORKER)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t1 = time.time()
    finally:
        worker.close()
    devices = [{"device": "sim:0", "kind": "cpu", "node": "host/0123abcd"}]
    return results, throughput(results, devices, t0, t1)


def test_call_ms_is_the_sims_per_call_time(sim_run):
    results, tp = sim_run
    calls = tp["devices"][0]["call_ms"]
    per_call_ms = BS / RATE * 1e3  # a call of one flip pass: bs crops
    # 16 boxes, bs 4, flip test: 4 batches of 2 calls
    assert calls["n"] == 8 == sum(r.calls for r in results)
    for key in ("min", "mean", "p50", "p90", "p99", "max"):
        assert calls[key] == pytest.approx(per_call_ms, rel=0.05), key
    assert calls["min"] <= calls["p50"] <= calls["p90"] <= calls["p99"] <= calls["max"]
    # what the device thread really held per call (the sim sleeps to its deadline): also the sim's time
    busy = tp["devices"][0]["busy_seconds"]
    assert busy / calls["n"] * 1e3 == pytest.approx(per_call_ms, rel=0.05)
    assert tp["devices"][0]["device_seconds"] == pytest.approx(calls["mean"] * calls["n"] / 1e3, rel=1e-6)


def test_call_ms_percentiles_are_numpys_linear_ones():
    seconds = np.array([0.004, 0.001, 0.002, 0.010, 0.003], np.float32)
    got = call_ms(seconds)
    ms = seconds.astype(np.float64) * 1e3
    assert got["n"] == 5 and got["min"] == pytest.approx(1.0) and got["max"] == pytest.approx(10.0)
    assert got["p50"] == pytest.approx(3.0)
    # linear: p90 lies 0.6 of the way from the 4th (4 ms) to the 5th (10 ms) value
    assert got["p90"] == pytest.approx(4.0 + 0.6 * 6.0)
    assert got["p99"] == pytest.approx(np.percentile(ms, 99)) == pytest.approx(4.0 + 0.96 * 6.0)
    assert call_ms(np.zeros(0))["n"] == 0


def test_host_stages_fit_where_they_run(sim_run):
    """Prep and post stages run in the PREP host processes only; slot waits (one batch is next in
    line for a slot at a time) and prep waits on the one device thread; every timed interval lies
    inside some shard's [started, finished], so each process or thread logs at most the device's
    wall time."""
    results, tp = sim_run
    row = tp["devices"][0]
    stages = row["host_seconds"]
    assert set(stages) == set(HOST_STAGES)
    assert all(f"host_seconds.{s}" in LABELS for s in HOST_STAGES)
    wall = row["wall_seconds"]
    assert sum(stages[s] for s in PREP_STAGES + POST_STAGES) <= wall * PREP
    assert stages["slot_wait"] <= wall * 1.01
    # the device thread either waits for inputs or runs the calls (busy), one at a time
    assert stages["prep_wait"] + row["busy_seconds"] <= wall * 1.01
    assert all(stages[s] > 0 for s in ("read_decode", "crop", "input", "flip_merge", "decode_keypoints"))
    assert row["host_dominant"] in {"read_decode", "crop", "input", "flip_merge", "decode_keypoints"}
    assert stages[row["host_dominant"]] == max(stages[s] for s in stages if not s.endswith("_wait"))


def test_terminal_table_shows_p50_p99_and_the_dominant_stage(sim_run):
    _, tp = sim_run
    text = format_throughput(tp)
    head, _, row = text.splitlines()[:3]
    # 'dev fps' and 'p50 ms' are two words each in the header; the row's values line up one to one
    names = head.replace("dev s", "dev_s").replace("dev fps", "dev_fps").replace(" ms", "_ms") \
        .replace("busy s", "busy_s").replace("wall s", "wall_s").split()
    cols = dict(zip(names, row.split()))
    calls = tp["devices"][0]["call_ms"]
    assert cols["p50_ms"] == f"{calls['p50']:.2f}" and cols["p99_ms"] == f"{calls['p99']:.2f}"
    line = next(ln for ln in text.splitlines() if ln.startswith("host time is dominated by"))
    top = tp["devices"][0]["host_dominant"]
    assert line.startswith(f"host time is dominated by {top}: {tp['devices'][0]['host_seconds'][top]:.2f} s")


def test_journal_keeps_the_figures(sim_run, tmp_path):
    results, tp = sim_run
    journal = Journal(tmp_path / "journal", {"x": 1})
    journal.start(resume=False)
    for r in results:
        journal.add(r)
    back = Journal(tmp_path / "journal", {"x": 1}).start(resume=True)
    for r in results:
        np.testing.assert_array_equal(back[r.shard_id].call_seconds, r.call_seconds)
        assert back[r.shard_id].host_seconds == pytest.approx(r.host_seconds)
    rebuilt = throughput(list(back.values()), [{"device": "sim:0", "kind": "cpu"}], 0.0, 1.0)
    assert rebuilt["devices"][0]["call_ms"] == tp["devices"][0]["call_ms"]
    assert rebuilt["devices"][0]["host_seconds"] == pytest.approx(tp["devices"][0]["host_seconds"])
    np.testing.assert_array_equal(back[results[0].shard_id].call_starts, results[0].call_starts)


def test_cli_run_writes_call_ms_and_host_seconds(tmp_path):
    """The whole runner on Ray: throughput.json carries the figures, the table prints them."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "runner", "--synthetic", "16", "--backend", "sim", "--bs", "4",
                           "--sim-rate", "1000", "--host-processes", "1", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((out / "throughput.json").read_text())["devices"][0]
    assert row["call_ms"]["n"] == 8
    assert row["call_ms"]["p50"] == pytest.approx(4.0, rel=0.05)  # 4 crops at 1000 crops/s
    assert row["call_ms"]["p99"] == pytest.approx(4.0, rel=0.05)
    assert sum(row["host_seconds"].values()) <= row["wall_seconds"] * (1 + IN_FLIGHT_PER_WORKER)
    assert f"host time is dominated by {row['host_dominant']}" in proc.stdout
    assert f"{row['call_ms']['p50']:>8.2f}" in proc.stdout
