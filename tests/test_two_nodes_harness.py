"""tests/two_nodes.py: two real Ray nodes on this host, the second one blind to the dataroot and the models dir.

Each node offers one NPU slot; the driver (this process) joins the head. The second node
alone has the fake CANN toolkit (``ray_support.fake_cann_toolkit``) on its PATH, so ATC
runs there (cluster/remote_atc.py) and the model reaches it through the object store
(cluster/staging.py). Skips, with the reason, where `unshare -m` is not allowed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from cluster.remote_atc import convert_where_cann_is  # noqa: E402
from cluster.staging import DIFFERS, local_model, model_files, ship_model  # noqa: E402
from fakes.fake_om import read_fake_om  # noqa: E402
from ray_support import cli_env, fake_cann_toolkit, logged  # noqa: E402
from tasks.files import file_sha256  # noqa: E402
from two_nodes import joined, two_nodes, wait_for_nodes  # noqa: E402

SOC = "Ascend310P3"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-nodes")
    dataroot, models = root / "data", root / "models"
    (dataroot / "val2017").mkdir(parents=True)
    (dataroot / "val2017" / "000000000139.jpg").write_bytes(b"\xff\xd8 not really a jpeg \xff\xd9")
    models.mkdir()
    bin_dir = fake_cann_toolkit(root / "toolkit")
    caches = {"head": root / "head-cache", "second": root / "second-cache"}
    env = cli_env(RUNNER_NODE_CACHE=str(caches["head"]))
    second_env = {"RUNNER_NODE_CACHE": str(caches["second"]), "FAKE_ATC_LOG": str(root / "atc.jsonl")}
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's functions travel by value
    with two_nodes(env, hidden=[dataroot, models], second_path=bin_dir, second_env=second_env) as nodes, \
            joined(nodes):
        head, second = wait_for_nodes(ray, 2)
        yield {"head": head["NodeID"], "second": second["NodeID"], "nodes": [head, second], "root": root,
               "address": nodes.address, "cli_env": dict(env, **nodes.driver_env),
               "dataroot": dataroot, "models": models, "bin": bin_dir, "caches": caches,
               "atc_log": root / "atc.jsonl"}


def on(node_id: str, function, *args, **options):
    """``function(*args)`` as a task pinned to ``node_id``; its result."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return ray.get(ray.remote(function).options(num_cpus=0, scheduling_strategy=strategy, **options)
                   .remote(*args), timeout=60)


class Looker:
    """An NPU worker's view of its node: what it can see, where it is, what Ray gave it."""

    def look(self, path: str) -> dict:
        return {"exists": os.path.exists(path), "node": ray.get_runtime_context().get_node_id(),
                "visible": os.environ.get("ASCEND_RT_VISIBLE_DEVICES"), "atc": shutil.which("atc")}


def test_both_nodes_register_with_one_npu_each_and_drivers_join(cluster):
    assert [n["Resources"].get("NPU") for n in cluster["nodes"]] == [1.0, 1.0]
    assert ray.cluster_resources()["NPU"] == 2.0 and ray.cluster_resources()["CPU"] == 2.0
    assert ray.get_runtime_context().get_node_id() == cluster["head"]  # Ray prefers the head on one host
    # A command in another process joins with the environment the harness names (token auth on).
    code = (f"import ray; ray.init(address={cluster['address']!r}, logging_level='ERROR'); "
            "print(sorted(n['Resources'].get('NPU') for n in ray.nodes() if n['Alive']))")
    proc = subprocess.run([sys.executable, "-c", code], env=cluster["cli_env"], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "[1.0, 1.0]", proc.stderr[-2000:]


def test_an_actor_on_the_second_node_cannot_see_the_hidden_dataroot(cluster):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    image = str(cluster["dataroot"] / "val2017" / "000000000139.jpg")
    views = {}
    for name in ("head", "second"):
        actor = ray.remote(Looker).options(num_cpus=0, resources={"NPU": 1}, scheduling_strategy=(
            NodeAffinitySchedulingStrategy(cluster[name], soft=False))).remote()
        views[name] = ray.get(actor.look.remote(image), timeout=60)
        ray.kill(actor)
    assert os.path.exists(image) and views["head"]["exists"] and not views["second"]["exists"]
    assert [views[n]["node"] for n in ("head", "second")] == [cluster["head"], cluster["second"]]
    assert views["second"]["visible"] == "0"  # Ray gave it the node's one NPU slot
    assert on(cluster["second"], _listdir, str(cluster["models"])) == []  # the models dir is empty there


def test_the_extra_path_entry_is_seen_only_on_the_second_node(cluster):
    assert shutil.which("atc") is None and on(cluster["head"], shutil.which, "atc") is None
    assert on(cluster["second"], shutil.which, "atc") == str(cluster["bin"] / "atc")


def test_atc_runs_on_the_second_node_and_the_om_then_travels_back_to_it(cluster):
    onnx = cluster["models"] / "pose-b4.onnx"  # the fake atc reads no ONNX: any bytes name one
    onnx.write_bytes(os.urandom(1 << 20))
    lines: list[str] = []
    om = convert_where_cann_is(onnx, cluster["models"], SOC, batch_size=4, log=lines.append)
    assert om.parent == cluster["models"] and om.name.startswith(f"pose-b4-{file_sha256(onnx)[:12]}-{SOC}-b4")
    assert len(logged(cluster["atc_log"])) == 1 and f"Ray node {cluster['second'][:8]}" in lines[0]
    info = json.loads(om.with_suffix(".json").read_text())
    assert info["atc_version"] == "8.0.RC1" and info["onnx"] == str(onnx)
    # The second node could not see the ONNX: it arrived through the object store into that node's cache.
    made, embedded = read_fake_om(om)  # the fake OM names the ONNX it was made from, and holds its bytes
    assert made["onnx"] == str(cluster["caches"]["second"] / file_sha256(onnx) / onnx.name)
    assert embedded == onnx.read_bytes()  # self-contained: it opens where that ONNX is not
    # The OM and its sidecar reach the second node the same way; the head opens the driver's file.
    shipped = ship_model(model_files(om))
    path, how = on(cluster["second"], local_model, shipped)
    assert how == "shipped" and Path(path).parent == cluster["caches"]["second"] / file_sha256(om)
    assert on(cluster["second"], _read_json, str(Path(path).with_suffix(".json")))["gears"] is None
    assert on(cluster["head"], local_model, shipped) == (om, "local")
    assert on(cluster["second"], local_model, shipped)[1] == "cached"


def test_a_different_copy_on_the_second_node_is_not_opened(cluster):
    model = cluster["models"] / "other.onnx"
    model.write_bytes(os.urandom(1 << 20))
    on(cluster["second"], Path.write_bytes, model, b"a stale copy")  # into the second node's own tmpfs
    path, how = on(cluster["second"], local_model, ship_model(model_files(model)))
    assert how == "shipped" + DIFFERS and on(cluster["second"], file_sha256, path) == file_sha256(model)
    assert model.read_bytes() != b"a stale copy"  # the driver's file is untouched


def _read_json(path: str) -> dict:
    return json.loads(Path(path).read_text())


def _listdir(path: str) -> list[str]:
    return os.listdir(path)
