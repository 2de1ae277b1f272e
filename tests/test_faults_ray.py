"""Faults during a Ray run: a worker killed (ray.kill, SIGKILL), every worker lost, Ctrl-C; then --resume.

A worker is killed once the first shard has been journalled, while 8 of 9 shards are
still queued or in flight, so the kill always lands mid-run. Every run must end with
the keypoints.json of an uninterrupted run, each box computed exactly once.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

import pytest

ray = pytest.importorskip("ray")

from ray_support import (check_throughput, cli_args, cli_env, config, journalled_box_ids,  # noqa: E402
                         read_devices, run_cli, shards_landed, wait_for)
from runner.driver import run  # noqa: E402
from runner.errors import RunError  # noqa: E402


@pytest.fixture
def two_npus():
    """A local Ray with two logical NPUs, owned by the test: the driver joins it."""
    ray.init(num_cpus=2, resources={"NPU": 2}, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def run_in_thread(cfg) -> tuple[threading.Thread, dict]:
    """``runner.driver.run(cfg)`` in a thread; the dict gets its outcome or its error."""
    ended: dict = {}

    def target() -> None:
        try:
            (ended["outcome"],) = run(cfg)
        except Exception as e:  # handed to the test thread
            ended["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, ended


def after_first_shard(out) -> list[dict]:
    """Once a shard is journalled: the workers as OUT/devices.json lists them."""
    described = wait_for(lambda: read_devices(out), what="OUT/devices.json")
    wait_for(lambda: shards_landed(out) >= 1, what="a journalled shard")
    return described


def check_exactly_once(out, data: dict) -> dict:
    assert (out / "keypoints.json").read_bytes() == data["expected"]
    assert sorted(journalled_box_ids(out)) == data["box_ids"]  # 0 lost, 0 computed twice
    return check_throughput(out, len(data["box_ids"]))


def test_ray_kill_mid_run_loses_nothing(tmp_path, data, two_npus):
    out = tmp_path / "out"
    thread, ended = run_in_thread(config(data["coco"], data["ckpt"], data["models"], out, devices="all"))
    victim = after_first_shard(out)[0]
    ray.kill(ray.get_actor(victim["actor"]))
    thread.join(timeout=300)
    assert "outcome" in ended, ended
    tp = check_exactly_once(out, data)
    assert tp["lost_devices"] == [victim["device"]] == ended["outcome"].lost_devices
    assert [d["id"] for d in tp["devices"] if d["lost"]] == [victim["device"]]
    assert [d["device"] for d in json.loads((out / "devices.json").read_text()) if d["lost"]] == [victim["device"]]


def test_sigkill_of_a_worker_process_loses_nothing(tmp_path, data):
    out = tmp_path / "out"
    proc = subprocess.Popen(cli_args(data["coco"], data["ckpt"], data["models"], out, "--devices", "cpu:2"),
                            cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = after_first_shard(out)[1]
        os.kill(victim["pid"], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert f"device {victim['device']} lost (The actor is dead because its worker process has died)" in stdout
    tp = check_exactly_once(out, data)
    assert tp["lost_devices"] == [victim["device"]]
    assert [d["id"] for d in tp["devices"] if d["lost"]] == [victim["device"]]


def test_every_worker_lost_keeps_finished_shards_then_resume(tmp_path, data, two_npus):
    out = tmp_path / "out"
    cfg = config(data["coco"], data["ckpt"], data["models"], out, devices="all")
    thread, ended = run_in_thread(cfg)
    for worker in after_first_shard(out):
        ray.kill(ray.get_actor(worker["actor"]))
    thread.join(timeout=300)
    error = ended.get("error")
    assert isinstance(error, RunError), ended
    assert "\n" not in str(error) and str(error).startswith("every device was lost (npu:")
    assert str(error).endswith("finished shards are kept: rerun the same command with --resume")
    kept = shards_landed(out)
    assert kept >= 1 and not (out / "keypoints.json").exists()

    (outcome,) = run(config(data["coco"], data["ckpt"], data["models"], out, devices="all", resume=True))
    tp = check_exactly_once(out, data)
    assert 0 < tp["totals"]["resumed_boxes"] < len(data["box_ids"]) and not outcome.lost_devices


def test_ctrl_c_then_resume_gives_identical_keypoints(tmp_path, data):
    out = tmp_path / "out"
    args = cli_args(data["coco"], data["ckpt"], data["models"], out, "--devices", "cpu:2")
    # Its own process group, so that SIGINT reaches the driver and Ray's processes as Ctrl-C does.
    proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        after_first_shard(out)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 130 and len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith("error: interrupted: ") and errors[0].endswith(
        "; rerun the same command with --resume")
    assert not (out / "keypoints.json").exists() and not list(out.glob(".keypoints.json*")), stderr[-3000:]
    kept = shards_landed(out)
    assert kept >= 1

    proc = run_cli([*args, "--resume"], cli_env(), tmp_path)
    assert f"({kept} done before)" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    tp = check_exactly_once(out, data)
    assert 0 < tp["totals"]["resumed_boxes"] < len(data["box_ids"])
