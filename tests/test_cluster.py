"""Placement on a real local Ray: logical NPUs on a CPU host, CPU backends in the actors.

An {"NPU": 1} actor holding the torch backend computes on the CPU
(``cluster.placement.compute_device``), so Ray's NPU scheduling and
ASCEND_RT_VISIBLE_DEVICES are real here; only the arithmetic is not on an NPU.
Every run must write the keypoints.json of an uninterrupted run without Ray, byte for byte.
"""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest

ray = pytest.importorskip("ray")

from cluster.devices import DeviceError  # noqa: E402
from ray_support import (FOUR_310P3, check_throughput, cli_args, cli_env, config, journalled_box_ids,  # noqa: E402
                         run_cli, write_fake_npu_smi)
from runner.driver import run  # noqa: E402


@pytest.fixture
def local_ray():
    """Start a local Ray with the given resources; shut it down after the test."""
    def start(**kwargs) -> None:
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR", **kwargs)

    yield start
    ray.shutdown()


def check_complete(out, data: dict, devices: int) -> list[dict]:
    """keypoints.json as without Ray, every box exactly once, crops adding up; returns devices.json."""
    assert (out / "keypoints.json").read_bytes() == data["expected"]
    assert sorted(journalled_box_ids(out)) == data["box_ids"]
    tp = check_throughput(out, len(data["box_ids"]))
    assert len(tp["devices"]) == devices and tp["totals"]["crops"] == 2 * len(data["box_ids"])
    assert all(d["boxes"] > 0 and not d["lost"] for d in tp["devices"])
    return json.loads((out / "devices.json").read_text())


@pytest.mark.parametrize("npus", [1, 4])  # one, and more than the host has cores
def test_logical_npus_give_identical_keypoints(npus, tmp_path, data, local_ray):
    local_ray(num_cpus=2, resources={"NPU": npus})
    out = tmp_path / "out"
    run(config(data["coco"], data["ckpt"], data["models"], out, devices="all"))
    described = check_complete(out, data, npus)
    # Inside each actor Ray set ASCEND_RT_VISIBLE_DEVICES to one id of its own.
    assert sorted(d["visible_devices"] for d in described) == [str(i) for i in range(npus)]
    assert sorted(d["device"] for d in described) == [f"npu:{i}" for i in range(npus)]
    assert len({d["pid"] for d in described}) == npus
    assert {d["compute_device"] for d in described} == {"cpu"}


def test_cli_pins_the_named_npus(tmp_path, data):
    """`--devices 1,3` on a host whose npu-smi lists four chips: each actor sees the chip it is named after."""
    bin_dir = write_fake_npu_smi(tmp_path / "bin", FOUR_310P3)
    env = cli_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    proc = run_cli(cli_args(data["coco"], data["ckpt"], data["models"], out, "--devices", "1,3"), env, tmp_path)
    described = check_complete(out, data, 2)
    assert sorted((d["device"], d["visible_devices"]) for d in described) == [("npu:1", "1"), ("npu:3", "3")]
    assert "backend torch computes on the CPU" in proc.stdout


def test_two_simulated_nodes_give_identical_keypoints(tmp_path, data):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"NPU": 2}})
    try:
        cluster.add_node(num_cpus=1, resources={"NPU": 2})
        cluster.wait_for_nodes()
        # --address joins the cluster; ids of this host's devices cannot name remote ones.
        with pytest.raises(DeviceError, match="cannot pick a Ray cluster's remote ones") as error:
            run(config(data["coco"], data["ckpt"], data["models"], tmp_path / "ids", devices="0,1",
                       address=cluster.address))
        assert "\n" not in str(error.value) and not ray.is_initialized()

        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        out = tmp_path / "out"
        run(config(data["coco"], data["ckpt"], data["models"], out, devices="all"))
    finally:
        ray.shutdown()
        cluster.shutdown()
    described = check_complete(out, data, 4)
    assert sorted(Counter(d["node_id"] for d in described).values()) == [2, 2]
    for node in {d["node_id"] for d in described}:
        assert sorted(d["visible_devices"] for d in described if d["node_id"] == node) == ["0", "1"]
    tp = json.loads((out / "throughput.json").read_text())
    assert len({d["id"] for d in tp["devices"]}) == 4 and len({d["node"] for d in tp["devices"]}) == 2
