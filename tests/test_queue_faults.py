"""The shard queue under trouble, end to end: a frozen worker, a late one, a lost node, a killed
driver, a full disk, a worker dead between batch sizes, and what --resume keeps or refuses.

Frozen and late workers are real processes stopped with SIGSTOP (the pid in OUT/devices.json),
on the sim backend: its heatmaps are zeros, so keypoints depend on the boxes alone and any
two runs of the same set must give the same bytes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from conftest import COCO_MINI, COCO_MINI_DETS, requires_shared  # noqa: E402
from ray_support import (check_throughput, cli_args, cli_env, config, journalled_box_ids, read_devices,  # noqa: E402
                         run_cli, shards_landed, wait_for)
from runner.driver import run  # noqa: E402
from runner.errors import RunError  # noqa: E402
from runner.journal import Journal  # noqa: E402

SIM = ("--backend", "sim", "--sim-rate", "20")  # 4 crops per shard: 0.2 s each


@pytest.fixture(scope="module")
def sim_expected(tmp_path_factory, synthetic_coco, random_checkpoint, models_dir) -> bytes:
    """keypoints.json of an undisturbed sim run of the synthetic set."""
    out = tmp_path_factory.mktemp("sim-ref") / "out"
    run(config(synthetic_coco, random_checkpoint, models_dir, out, backend="sim", sim_rate=1000.0))
    return (out / "keypoints.json").read_bytes()


def start_cli(data: dict, out, *more: str) -> subprocess.Popen:
    return subprocess.Popen(cli_args(data["coco"], data["ckpt"], data["models"], out, "--devices", "cpu:2", *more),
                            cwd=out.parent, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def freeze_second_worker(out) -> dict:
    """SIGSTOP the second worker once a shard is journalled; returns its devices.json entry."""
    victim = wait_for(lambda: read_devices(out), what="OUT/devices.json")[1]
    wait_for(lambda: shards_landed(out) >= 1, what="a journalled shard")
    os.kill(victim["pid"], signal.SIGSTOP)
    return victim


def resume_process(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def run_with_second_worker_frozen(data: dict, out, *flags: str) -> tuple[str, dict]:
    """The CLI on two sim workers, the second frozen once a shard is journalled; (stdout, its entry)."""
    proc = start_cli(data, out, *SIM, *flags)
    victim = None
    try:
        victim = freeze_second_worker(out)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        if victim:
            resume_process(victim["pid"])
    assert proc.returncode == 0, stderr[-3000:]
    return stdout, victim


def check_each_shard_once(out, data: dict, expected: bytes) -> dict:
    assert (out / "keypoints.json").read_bytes() == expected
    assert sorted(journalled_box_ids(out)) == data["box_ids"]
    return check_throughput(out, len(data["box_ids"]))


def timeline_events(out, boxes: int) -> tuple[list[dict], list[dict], list[dict]]:
    """timeline.json's shard spans, call spans and markers; the kept shards hold every box once."""
    from tasks.timeline import winning_boxes

    trace = json.loads((out / "timeline.json").read_text())
    events = trace["traceEvents"]
    shards = [e for e in events if e.get("cat") == "shard"]
    kept = sorted(e["args"]["shard"] for e in shards if e["args"]["won"])
    assert winning_boxes(trace) == boxes and kept == sorted(set(kept))
    return shards, [e for e in events if e.get("cat") == "call"], [e for e in events if e.get("ph") == "i"]


def test_a_frozen_worker_is_declared_lost_and_the_run_finishes(tmp_path, data, sim_expected):
    out = tmp_path / "out"
    started = time.monotonic()
    stdout, victim = run_with_second_worker_frozen(data, out, "--device-timeout", "3", "--straggler-factor", "0")
    assert time.monotonic() - started < 90
    lines = [line for line in stdout.splitlines() if line.startswith(f"device {victim['device']} lost (")]
    assert len(lines) == 1 and "(device timeout 3 s)" in lines[0], stdout[-3000:]
    assert lines[0].startswith(f"device {victim['device']} lost (no result for 3 s while holding ")
    tp = check_each_shard_once(out, data, sim_expected)
    assert tp["lost_devices"] == [victim["device"]]
    row = next(d for d in tp["devices"] if d["id"] == victim["device"])
    assert row["lost"] and row["lost_reason"].startswith("no result for 3 s")
    _, _, markers = timeline_events(out, len(data["box_ids"]))
    lost = [m for m in markers if m["args"]["kind"] == "device_lost"]
    assert len(lost) == 1 and lost[0]["name"].startswith(f"{victim['device']} lost: no result for 3 s")


def test_a_late_worker_is_overtaken_by_a_copy_and_each_shard_counts_once(tmp_path, data, sim_expected):
    out = tmp_path / "out"
    stdout, victim = run_with_second_worker_frozen(data, out, "--device-timeout", "0", "--straggler-factor", "2",
                                                   "--straggler-floor", "1")
    tp = check_each_shard_once(out, data, sim_expected)
    copies = [line for line in stdout.splitlines() if line.startswith("shard ") and "a copy runs on" in line]
    other = next(d["id"] for d in tp["devices"] if d["id"] != victim["device"])
    assert copies and all(line.endswith(f"a copy runs on {other}") for line in copies), stdout[-3000:]
    t = tp["totals"]
    assert t["speculative_copies"] == len(copies) == t["speculative_copies_won"]
    assert sum(d["copies_won"] for d in tp["devices"]) == t["speculative_copies_won"]
    assert not tp["lost_devices"] and t["boxes"] == len(data["box_ids"])  # late, not lost
    shards, _, markers = timeline_events(out, len(data["box_ids"]))
    assert [m["name"] for m in markers if m["args"]["kind"] == "copy_sent"] == copies
    won = [e["args"]["shard"] for e in shards if e["args"]["copy"] and e["args"]["won"]]
    beaten = [e["args"]["shard"] for e in shards if not e["args"]["won"]]  # the frozen originals, cancelled
    assert len(won) == t["speculative_copies_won"] and sorted(beaten) == sorted(won)


def test_losing_the_node_of_one_worker_completes_on_the_other(tmp_path, data, sim_expected):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"NPU": 1}})
    out = tmp_path / "out"
    try:
        node = cluster.add_node(num_cpus=1, resources={"NPU": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        import threading

        ended = {}
        thread = threading.Thread(target=lambda: ended.update(outcome=run(config(
            data["coco"], data["ckpt"], data["models"], out, devices="all", backend="sim", sim_rate=20.0))),
            daemon=True)
        thread.start()
        described = wait_for(lambda: read_devices(out), what="OUT/devices.json")
        wait_for(lambda: shards_landed(out) >= 1, what="a journalled shard")
        victim = next(d for d in described if d["node_id"] == node.node_id)
        cluster.remove_node(node)
        thread.join(timeout=180)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert "outcome" in ended
    tp = check_each_shard_once(out, data, sim_expected)
    assert tp["lost_devices"] == [victim["device"]] == ended["outcome"][0].lost_devices
    assert [d["node"] for d in tp["devices"] if not d["lost"]] != [victim["node"]]


def test_a_killed_driver_resumes_to_identical_keypoints(tmp_path, data):
    out = tmp_path / "out"
    args = cli_args(data["coco"], data["ckpt"], data["models"], out, "--devices", "cpu:2")
    proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        wait_for(lambda: shards_landed(out) >= 1, what="a journalled shard")
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    kept = shards_landed(out)
    assert proc.returncode == -signal.SIGKILL and 1 <= kept < 9 and not (out / "keypoints.json").exists()
    resumed = run_cli([*args, "--resume"], cli_env(), tmp_path)
    assert f"({kept} done before)" in resumed.stdout
    assert (out / "keypoints.json").read_bytes() == data["expected"]
    assert sorted(journalled_box_ids(out)) == data["box_ids"]
    # The timeline keeps the earlier part's shards and calls (from the journal) beside the resumed part's.
    shards, calls, _ = timeline_events(out, len(data["box_ids"]))
    started = json.loads((out / "run.json").read_text())["started"]
    before = {e["args"]["shard"] for e in shards if e["ts"] / 1e6 + shards_start(out) < started}
    assert len(before) == kept and {e["args"]["shard"] for e in calls} == {e["args"]["shard"] for e in shards}


def shards_start(out) -> float:
    """The unix time of a timeline's 0."""
    return json.loads((out / "timeline.json").read_text())["otherData"]["run_start_unix_s"]


def test_a_worker_dead_between_batch_sizes_is_dropped_and_the_sweep_goes_on(tmp_path, data):

    ray.init(num_cpus=2, resources={"NPU": 2}, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    out = tmp_path / "out"
    lines, killed = [], []

    def log(line, *a, **k):
        lines.append(str(line))
        if str(line).startswith("bs 1: ") and not killed:  # bs 1 is done, bs 2 not started
            victim = json.loads((out / "bs1" / "devices.json").read_text())[1]
            ray.kill(ray.get_actor(victim["actor"]))
            killed.append(victim["device"])

    try:
        run(config(data["coco"], data["ckpt"], data["models"], out, devices="all", backend="sim",
                         bs=(1, 2), quiet=False), log=log)
    finally:
        ray.shutdown()
    assert killed and any(line.startswith(f"device {killed[0]} lost (it could not switch to bs 2") for line in lines)
    tp = json.loads((out / "bs2" / "throughput.json").read_text())
    assert [d["id"] for d in tp["devices"]] != killed and tp["totals"]["boxes"] == 18
    assert (out / "summary.json").exists()


@pytest.fixture(scope="class")
def one_ray():
    """One private Ray for a class of in-process runs. Each run joins it (a Ray the caller
    started: ``Session.existing``) instead of starting and stopping its own, about 4 s a run."""
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.usefixtures("one_ray")
class TestOnOneRay:
    """Journal, resume and share rules: what they check happens in the driver, whichever Ray runs the workers."""

    @requires_shared
    def test_coco_mini_on_two_workers_gives_each_a_fair_share(self, tmp_path, random_checkpoint, models_dir):
        coco = {"dataroot": str(COCO_MINI), "dets": str(COCO_MINI_DETS)}
        out = tmp_path / "out"
        run(config(coco, random_checkpoint, models_dir, out, backend="sim", sim_rate=100.0, bs=(16,), shard_size=64,
                   devices="cpu:2"))
        tp = json.loads((out / "throughput.json").read_text())
        crops = [d["crops"] for d in tp["devices"]]
        assert len(crops) == 2 and sum(crops) == 236 and min(crops) >= 0.3 * 236, crops

    def test_a_small_run_still_gives_every_worker_two_shards(self, tmp_path, data):
        out = tmp_path / "out"
        # 18 boxes at bs 2 with --shard-size 64: 9 batches, 2 per shard for 2 workers.
        run(config(data["coco"], data["ckpt"], data["models"], out, backend="sim", shard_size=64, devices="cpu:2"))
        assert Journal.previous_fingerprint(out / "journal")["shard_boxes"] == 4
        tp = json.loads((out / "throughput.json").read_text())
        assert all(d["boxes"] >= 4 for d in tp["devices"]) and tp["totals"]["boxes"] == 18

    def test_a_full_disk_while_journalling_stops_with_one_line(self, tmp_path, data, monkeypatch):
        out = tmp_path / "out"
        real_add = Journal.add
        calls = []

        def add(self, result):
            calls.append(result.shard_id)
            if len(calls) == 3:
                raise OSError(28, "No space left on device")
            real_add(self, result)

        monkeypatch.setattr(Journal, "add", add)
        with pytest.raises(RunError) as error:
            run(config(data["coco"], data["ckpt"], data["models"], out, backend="sim"))
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"{out / 'journal'}: cannot save a finished shard "
                                                          "(No space left on device); the 2 shards saved before")
        assert message.endswith("rerun the same command with --resume") and shards_landed(out) == 2
        monkeypatch.setattr(Journal, "add", real_add)
        run(config(data["coco"], data["ckpt"], data["models"], out, backend="sim", resume=True))
        assert sorted(journalled_box_ids(out)) == data["box_ids"]

    def test_a_resume_of_a_finished_run_keeps_its_figures(self, tmp_path, data):
        out = tmp_path / "out"
        run(config(data["coco"], data["ckpt"], data["models"], out, backend="sim", devices="cpu:2"))
        before = {name: (out / name).read_bytes() for name in ("throughput.json", "run.json", "keypoints.json")}
        (outcome,) = run(config(data["coco"], data["ckpt"], data["models"], out, backend="sim", devices="cpu:2",
                                resume=True))
        assert {name: (out / name).read_bytes() for name in before} == before
        assert outcome.throughput["totals"]["boxes"] == 18 and len(outcome.throughput["devices"]) == 2
        # Without its throughput.json (a crash after the last shard), the figures come from the journal.
        (out / "throughput.json").unlink()
        (outcome,) = run(config(data["coco"], data["ckpt"], data["models"], out, backend="sim", devices="cpu:2",
                                resume=True))
        old = json.loads(before["throughput.json"])
        new = outcome.throughput
        assert new["totals"]["rebuilt_from_journal"] and new["totals"]["boxes"] == 18
        assert sorted((d["id"], d["boxes"], d["crops"], d["bytes_to_device"]) for d in new["devices"]) == \
            sorted((d["id"], d["boxes"], d["crops"], d["bytes_to_device"]) for d in old["devices"])

    def test_resume_retries_the_boxes_skipped_before(self, tmp_path, data):
        import shutil

        coco = dict(data["coco"])
        root = tmp_path / "coco"
        shutil.copytree(coco["dataroot"], root)
        coco["dataroot"] = str(root)
        image = sorted((root / "val2017").glob("*.jpg"))[0]
        whole = image.read_bytes()
        image.write_bytes(whole[: len(whole) // 2])  # truncated: its boxes are skipped
        out = tmp_path / "out"
        (first,) = run(config(coco, data["ckpt"], data["models"], out, backend="sim"))
        assert first.metrics["skipped"] > 0 and not first.metrics["complete"]
        image.write_bytes(whole)  # the file is back
        (second,) = run(config(coco, data["ckpt"], data["models"], out, backend="sim", resume=True))
        assert second.metrics["skipped"] == 0 and second.metrics["complete"]
        assert second.metrics["results_before_nms"] == 18

    def test_resume_refuses_a_changed_annotation_file(self, tmp_path, data):
        import shutil

        coco = dict(data["coco"])
        root = tmp_path / "coco"
        shutil.copytree(coco["dataroot"], root)
        ann = root / "annotations" / "person_keypoints_val2017.json"
        out = tmp_path / "out"
        cfg = config({"dataroot": str(root), "dets": None}, data["ckpt"], data["models"], out, backend="sim", boxes="gt")
        run(cfg)
        stamp = Journal.previous_fingerprint(out / "journal")
        assert {"ann_sha256", "model_sha256", "soc_version", "device_kinds", "runner_version"} <= set(stamp)
        assert stamp["device_kinds"] == ["cpu"] and stamp["box_source_sha256"] == "gt"
        data_ann = json.loads(ann.read_text())
        data_ann["annotations"][0]["keypoints"][2] = 0  # one GT keypoint hidden: the AP would change
        ann.write_text(json.dumps(data_ann))
        from runner.journal import JournalMismatch

        with pytest.raises(JournalMismatch, match="--resume with different ann_sha256 than the interrupted run"):
            run(config({"dataroot": str(root), "dets": None}, data["ckpt"], data["models"], out, backend="sim",
                       boxes="gt", resume=True))

    def test_a_sweep_dumps_each_batch_size_into_its_own_directory(self, tmp_path, data):
    
        out = tmp_path / "out"
        run(config(data["coco"], data["ckpt"], data["models"], out, backend="sim", bs=(1, 2), dump_heatmaps=True))
        for bs in (1, 2):
            dumps = sorted((out / f"bs{bs}" / "heatmaps").glob("shard-*.npz"))
            ids = np.concatenate([np.load(p)["box_ids"] for p in dumps])
            assert sorted(ids.tolist()) == data["box_ids"], bs
