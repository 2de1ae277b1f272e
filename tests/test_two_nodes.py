"""Issue 25's acceptance: one run over two Ray nodes whose second one cannot see the driver's storage.

The cluster (tests/two_nodes.py) is two real Ray nodes on this host, one NPU slot each;
the second node's mount namespace hides the dataroot and the ``--models-dir`` under
tmpfs, as a second host without the driver's disks. The driver (the CLI, ``--address``)
runs on the head. The second node has a host name of its own (``SECOND_HOST``): two NPU
workers on one host would share its chip 0, which the pool refuses (test_om_ray.py). Both
nodes have the fake aclruntime / ais_bench importable; only the second has the fake CANN
toolkit (``atc``) on its PATH, so the head has no ``atc`` at all. One module-scoped
cluster serves every test.

Data: coco-mini's images (``../shared``; skipped without it) copied to a dataroot of
this module's, and 16 of its detections, bs 4, shards of one batch: 4 shards, two per
worker at the start (``cluster.queue``: two in flight per worker). Shards 0 and 1 each
hold two boxes of ``000000000785.jpg`` (``DAMAGED``), shards 2 and 3 none, so whichever
worker the second node's is, its first shard needs that image and its second does not
(test (d)). The boxes are coco-mini's first detections (images 785 and 197388): on those
a random network's heatmaps have no near-tied maxima (tests/test_cli.py), so the OM run
may be compared exactly. The reference is a one-host run, ``--devices cpu
--no-uint8-input``, no cluster, started while the cluster starts.

Every cluster run passes ``--straggler-factor 0`` (no speculative copies: a late shard
copied to the head on a loaded host could leave the second node with nothing to show)
and ``--threads 1`` (each node offers one CPU).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import COCO_MINI, COCO_MINI_DETS, REPO, requires_shared

ray = pytest.importorskip("ray")

from ray_support import FAKES, check_throughput, cli_env, fake_cann_toolkit, logged  # noqa: E402
from tasks.export import ExportOptions  # noqa: E402
from two_nodes import joined, two_nodes, unshare_unavailable, wait_for_nodes  # noqa: E402

pytestmark = requires_shared

BS = 4
SOC = "Ascend310P3"
SECOND_HOST = "rn2-second"
DAMAGED = "000000000785.jpg"  # its boxes are in shards 0 and 1 only (see the module's note)
OTHER = "000000197388.jpg"
RUN_TIMEOUT = 240


def pick_detections() -> list[dict]:
    """16 of coco-mini's detections in the order the module's note gives: shard k = boxes 4k..4k+3."""
    every = json.loads(COCO_MINI_DETS.read_text())
    damaged = [d for d in every if d["image_id"] == 785][:4]
    other = [d for d in every if d["image_id"] == 197388][:12]
    return damaged[:2] + other[:2] + damaged[2:4] + other[2:4] + other[4:12]


def copy_dataroot(dst: Path) -> Path:
    """coco-mini's images and annotations (not its detections) under ``dst``."""
    for sub in ("val2017", "annotations"):
        shutil.copytree(COCO_MINI / sub, dst / sub)
    return dst


def cli(env: dict, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)


def finished(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, exported):
    """The files, the reference run and the cluster, once for the module.

    ``data``: the dataroot every run reads (hidden on the second node); ``data2``: a second copy,
    also hidden there, for test (d) to plant a damaged copy into; ``models``: the --models-dir
    (hidden there), holding the checkpoint and its ONNX exports already (conftest ``exported``).
    """
    why = unshare_unavailable()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("two-nodes-run")
    data, data2 = copy_dataroot(root / "data"), copy_dataroot(root / "data2")
    dets = root / "dets.json"
    dets.write_text(json.dumps(pick_detections()))
    # The onnxruntime runs' export (dynamic batch, float input) and the OM's (static batch 4).
    models = exported(root / "models", ExportOptions(), ExportOptions(batch_size=BS))
    weights = models / "fastpose-random-seed0.pth"
    common = ["--dataroot", str(data), "--dets", str(dets), "--weights", str(weights), "--models-dir", str(models),
              "--bs", str(BS), "--shard-size", str(BS), "--threads", "1", "--quiet"]
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(cli, cli_env(), *common, "--devices", "cpu", "--backend", "onnxruntime",
                                "--no-uint8-input", "--out", str(root / "reference"), cwd=root)

        toolkit = fake_cann_toolkit(root / "toolkit")
        caches = {"head": root / "head-cache", "second": root / "second-cache"}
        logs = {"atc": root / "atc.jsonl", "acl": root / "acl.jsonl"}
        # Both nodes: the fake aclruntime / ais_bench importable; no fake bin on PATH (the head has no atc).
        env = cli_env(PYTHONPATH=os.pathsep.join([str(FAKES), str(REPO)]), FAKE_AIS_BENCH_API="new",
                      FAKE_ASCEND_SOC=SOC, FAKE_ACL_LOG=str(logs["acl"]), RUNNER_NODE_CACHE=str(caches["head"]))
        second_env = {"RUNNER_NODE_CACHE": str(caches["second"]), "FAKE_ATC_LOG": str(logs["atc"])}
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # _plant travels by value
        with two_nodes(env, hidden=[data, data2, models], second_path=toolkit, second_env=second_env,
                       second_hostname=SECOND_HOST) as nodes:
            with joined(nodes):
                head, second = wait_for_nodes(ray, 2)
            ref = reference.result()
            finished(ref)
            yield {"root": root, "data": data, "data2": data2, "dets": dets, "models": models, "weights": weights,
                   "reference": (root / "reference" / "keypoints.json").read_bytes(), "nodes": nodes,
                   "head": head["NodeID"], "second": second["NodeID"], "caches": caches, "logs": logs,
                   "env": dict(env, **nodes.driver_env),
                   "args": ["--address", nodes.address, "--devices", "all", "--dets", str(dets),
                            "--weights", str(weights), "--models-dir", str(models), "--bs", str(BS),
                            "--shard-size", str(BS), "--threads", "1", "--straggler-factor", "0"]}


def by_node(out: Path, setup: dict) -> dict[str, dict]:
    """devices.json's workers as {"head": ..., "second": ...}, one each."""
    workers = json.loads((out / "devices.json").read_text())
    found = {name: [w for w in workers if w["node_id"] == setup[name]] for name in ("head", "second")}
    assert [len(found["head"]), len(found["second"])] == [1, 1], workers
    return {name: found[name][0] for name in found}


def journalled(out: Path) -> list[tuple[str, list[int], list]]:
    """(device, box ids, skipped) of each shard in OUT's journal."""
    shards = []
    for path in sorted((out / "journal").glob("shard-*.npz")):
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            shards.append((meta["device"], z["box_ids"].tolist(), meta["skipped"]))
    return shards


def box_ids_of(setup: dict, image: str) -> set[int]:
    from tasks.dataset import load_boxes

    box_set = load_boxes(str(setup["data"]), str(setup["dets"]))
    return {b.id for b in box_set.boxes if Path(box_set.image_paths[b.image_id]).name == image}


def clear_node_caches(setup: dict) -> None:
    """No model in either node's cache (they sit on this host's disk, outside the hidden folders)."""
    for cache in setup["caches"].values():
        shutil.rmtree(cache, ignore_errors=True)


def test_a_devices_all_uses_both_nodes_and_matches_one_host(setup, tmp_path):
    """(a) ``--devices all --backend onnxruntime`` on the cluster completes with nothing skipped;
    both workers computed; the second node's worker got the model and the images through Ray
    (devices.json: ``model_source`` and ``images`` "shipped", ``data_missing`` one of its sample
    paths), the head's read the driver's files ("local", "local", nothing missing); keypoints.json
    is byte for byte the one-host ``--devices cpu --no-uint8-input`` run's."""
    clear_node_caches(setup)  # a model left there by an earlier test would be "cached", not "shipped"
    out = tmp_path / "out"
    proc = cli(setup["env"], *setup["args"], "--backend", "onnxruntime", "--dataroot", str(setup["data"]),
               "--out", str(out), cwd=tmp_path)
    finished(proc)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["skipped"] == 0 and metrics["skipped_boxes"] == [], metrics
    assert metrics["boxes"] == 16
    tp = check_throughput(out, 16)
    assert len(tp["devices"]) == 2 and all(d["boxes"] > 0 for d in tp["devices"]), tp["devices"]
    workers = by_node(out, setup)
    head, second = workers["head"], workers["second"]
    assert (head["model_source"], head["images"], head["data_missing"]) == ("local", "local", None), head
    assert (second["model_source"], second["images"]) == ("shipped", "shipped"), second
    assert second["data_missing"] and Path(second["data_missing"]).parent == setup["data"] / "val2017", second
    assert {d["id"] for d in tp["devices"]} == {head["device"], second["device"]}
    assert (out / "keypoints.json").read_bytes() == setup["reference"]


def test_b_ship_images_never_is_one_line_naming_the_node_and_the_image(setup, tmp_path):
    """(b) ``--ship-images never`` where the second node cannot see the dataroot: exit 2, exactly
    one ``error:`` line on stderr naming that node (its Ray node id prefix, as devices.json's
    ``node``: both nodes share this host's IP) and an image path it is missing; nothing in OUT."""
    out = tmp_path / "out"
    proc = cli(setup["env"], *setup["args"], "--backend", "onnxruntime", "--dataroot", str(setup["data"]),
               "--ship-images", "never", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    (line,) = errors
    print(line)
    assert setup["second"][:8] in line and setup["head"][:8] not in line, line
    images = [str(setup["data"] / "val2017" / name) for name in (DAMAGED, OTHER)]
    assert any(image in line for image in images), line
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_c_om_converts_on_the_node_with_atc_and_matches_onnxruntime(setup, tmp_path):
    """(c) ``--backend om --soc-version Ascend310P3`` where only the second node has ``atc``: the
    conversion runs there (the fake atc's log, and the ``.atc.log`` beside the OM naming that
    node), the OM comes back to the driver's models dir and travels to the second node through
    Ray (it opens its node-cache copy: a fake OM is self-contained, tests/fakes/fake_om.py), and
    keypoints.json equals the onnxruntime run's exactly (test_om_ray.py's rule: the fake OM runs
    the same network with ONNX Runtime); here the one-host reference, which (a) equals byte for byte."""
    if shutil.which("atc", path=setup["env"]["PATH"]):
        pytest.skip("an atc is on this host's PATH: the conversion would not need the second node")
    for log in setup["logs"].values():
        log.unlink(missing_ok=True)
    out = tmp_path / "out"
    proc = cli(setup["env"], *setup["args"], "--backend", "om", "--soc-version", SOC,
               "--dataroot", str(setup["data"]), "--out", str(out), cwd=tmp_path)
    finished(proc)
    (argv,) = logged(setup["logs"]["atc"])  # one conversion, by the second node's atc
    model = next(a.split("=", 1)[1] for a in argv if a.startswith("--model="))
    assert Path(model).is_relative_to(setup["caches"]["second"]), argv  # the ONNX shipped to it
    assert f"--soc_version={SOC}" in argv and f"--input_shape=image:{BS},3,256,192" in argv
    (om,) = setup["models"].glob(f"*-{SOC}-b{BS}.om")  # the OM is in the driver's models dir
    assert f"(Ray node {setup['second']})" in om.with_name(om.stem + ".atc.log").read_text().splitlines()[0]
    workers = by_node(out, setup)
    assert {w["backend"] for w in workers.values()} == {"om"}
    assert workers["head"]["model_source"] == "local" and workers["second"]["model_source"] == "shipped"
    sessions = {s["pid"]: s["model"] for s in logged(setup["logs"]["acl"])}
    assert sessions[workers["head"]["pid"]] == str(om)
    assert Path(sessions[workers["second"]["pid"]]).is_relative_to(setup["caches"]["second"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["skipped"] == 0, metrics
    assert json.loads((out / "keypoints.json").read_text()) == json.loads(setup["reference"])


def _plant(root: str, files: dict[str, bytes]) -> dict[str, int]:
    """Write ``files`` (relative path -> bytes) under ``root`` on the node this runs on; their sizes there."""
    for relative, data in files.items():
        path = Path(root, relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {relative: os.path.getsize(Path(root, relative)) for relative in files}


def test_d_a_damaged_image_on_the_second_node_runs_again_on_the_head(setup, tmp_path):
    """(d) The second node holds its own copy of the dataroot, in which ``DAMAGED`` lost its second
    half (the bytes after it are zeros: a copy cut short into a preallocated file, so the file keeps
    its size and the workers' start-up sample, which compares sizes, sees nothing wrong:
    devices.json says images "local" and nothing missing). The worker there cannot read that image
    (no JPEG end marker), so its shard runs again on the head: the run completes with nothing
    skipped, every box of that image was computed by the head's worker (the journal names the
    device of each shard), the log says the shard ran again on another device, and keypoints.json
    is byte for byte the reference's."""
    data2 = setup["data2"]
    files = {f"val2017/{p.name}": p.read_bytes() for p in sorted((data2 / "val2017").glob("*.jpg"))}
    whole = files[f"val2017/{DAMAGED}"]
    files[f"val2017/{DAMAGED}"] = whole[:len(whole) // 2] + bytes(len(whole) - len(whole) // 2)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    with joined(setup["nodes"]):  # into the second node's own tmpfs over data2
        strategy = NodeAffinitySchedulingStrategy(setup["second"], soft=False)
        sizes = ray.get(ray.remote(_plant).options(num_cpus=0, scheduling_strategy=strategy)
                        .remote(str(data2), files), timeout=60)
    assert sizes == {name: (data2 / name).stat().st_size for name in files}  # same sizes as the driver's
    assert (data2 / "val2017" / DAMAGED).read_bytes() == whole  # the driver's copy is whole

    out = tmp_path / "out"
    proc = cli(setup["env"], *setup["args"], "--backend", "onnxruntime", "--dataroot", str(data2),
               "--out", str(out), cwd=tmp_path)
    finished(proc)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["skipped"] == 0 and metrics["skipped_boxes"] == [], metrics
    workers = by_node(out, setup)
    assert (workers["second"]["images"], workers["second"]["data_missing"]) == ("local", None), workers["second"]
    shards = journalled(out)
    assert sorted(i for _, ids, _ in shards for i in ids) == list(range(16)) and all(not s for *_, s in shards)
    damaged = box_ids_of(setup, DAMAGED)
    assert len(damaged) == 4
    assert {device for device, ids, _ in shards if damaged & set(ids)} == {workers["head"]["device"]}, shards
    again = [line for line in (proc.stdout + proc.stderr).splitlines() if "again on another device" in line]
    print("\n".join(again))
    assert any(workers["second"]["device"] in line for line in again), (proc.stdout + proc.stderr)[-3000:]
    assert (out / "keypoints.json").read_bytes() == setup["reference"]
