"""Helpers shared by the Ray tests (test_cluster.py, test_faults_ray.py, test_om_ray.py, test_detector_ray.py).

The runs are small on purpose: 18 synthetic boxes, the torch backend, bs 2 and
shards of one batch, so that 9 shards spread over the workers and a run lasts a
few seconds on 2 cores, long enough to kill a worker or press Ctrl-C mid-run.
Every worker runs torch with one thread: torch's CPU kernels sum in an order that
depends on the thread count (heatmaps move by ~7e-8, measured), so byte-identical
results across device counts need the same threads per worker. ONNX Runtime's
do not (measured identical for 1 and 2 threads).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from conftest import REPO

BS = 2
FAKES = REPO / "tests" / "fakes"

# Hand-written, NOT a real capture: two Atlas 300I Duo cards, four 310P3 chips (logical ids 0-3).
FOUR_310P3 = """\
+-------------------------------+-----------------+------------------------------------------------------+
| NPU     Name                  | Health          | Power(W)     Temp(C)           Hugepages-Usage(page) |
| Chip    Device                | Bus-Id          | AICore(%)    Memory-Usage(MB)                        |
+===============================+=================+======================================================+
| 32768   310P3                 | OK              | NA           50                0     / 0             |
| 0       0                     | 0000:81:00.0    | 0            100 / 44280                             |
+-------------------------------+-----------------+------------------------------------------------------+
| 32768   310P3                 | OK              | NA           50                0     / 0             |
| 1       1                     | 0000:81:00.0    | 0            100 / 43693                             |
+===============================+=================+======================================================+
| 32769   310P3                 | OK              | NA           50                0     / 0             |
| 0       2                     | 0000:82:00.0    | 0            100 / 44280                             |
+-------------------------------+-----------------+------------------------------------------------------+
| 32769   310P3                 | OK              | NA           50                0     / 0             |
| 1       3                     | 0000:82:00.0    | 0            100 / 43693                             |
+===============================+=================+======================================================+
"""


def write_fake_npu_smi(bin_dir: Path, info: str = FOUR_310P3) -> Path:
    """An `npu-smi` that answers `info` with ``info``; put ``bin_dir`` first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "info.txt").write_text(info)
    script = bin_dir / "npu-smi"
    script.write_text(f"""#!/bin/sh
if [ "$*" != "info" ]; then echo "Error: unsupported parameter: $*" >&2; exit 2; fi
cat "{bin_dir}/info.txt"
""")
    script.chmod(0o755)
    return bin_dir


def cli_env(**extra: str) -> dict[str, str]:
    """The user's environment without Ray/Ascend leftovers, with the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASCEND_", "FAKE_", "RAY_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def cli_args(data: dict, checkpoint: str, models_dir: str, out: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "runner", "--dataroot", data["dataroot"], "--dets", data["dets"],
            "--weights", checkpoint, "--backend", "torch", "--bs", str(BS), "--shard-size", str(BS), "--threads", "1",
            "--models-dir", models_dir, "--out", str(out), *more]


def run_cli(args: list[str], env: dict[str, str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"runner failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def at_once(*calls):
    """Independent CLI runs side by side; their results in order.

    Most of a small run's wall time is Python, Ray and the workers starting, which
    leaves the host's cores idle, and nothing a run writes depends on another running
    (each has its own OUT, Ray and logs; a models dir they share holds finished files).
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def config(data: dict, checkpoint: str, models_dir: str, out: Path, **overrides):
    """A RunConfig as the CLI would build it, for ``runner.driver.run`` in this process."""
    from runner.config import changed, load_config

    cfg = load_config(None, {"dataroot": data["dataroot"], "dets": data["dets"], "weights": checkpoint,
                             "backend": "torch", "bs": BS, "shard_size": BS, "threads": 1, "models_dir": models_dir,
                             "out": str(out), "quiet": True, **overrides})
    # load_config reads None as "not given": an override that clears a key is set afterwards.
    return changed(cfg, **{k: v for k, v in overrides.items() if v is None})


@functools.lru_cache(maxsize=None)
def reference_keypoints(dataroot: str, dets: str, checkpoint: str) -> bytes:
    """keypoints.json as an uninterrupted run writes it, computed without Ray, batch by batch."""
    from tasks.backends import open_backend
    from tasks.dataset import load_boxes, read_rgb
    from reference_evaluation import pose_records, rescore_and_nms
    from tasks.pipeline import keypoints_for_batch, prepare_batch

    box_set = load_boxes(dataroot, dets)
    backend = open_backend("torch", checkpoint, "cpu", BS, 1)
    images = {i: read_rgb(p) for i, p in box_set.image_paths.items()}
    ids, kpts, crop_boxes = [], [], []
    for start in range(0, len(box_set.boxes), BS):
        batch = prepare_batch(box_set.boxes[start:start + BS], images)
        keypoints, _ = keypoints_for_batch(backend, batch)
        ids.append(batch.box_ids), kpts.append(keypoints), crop_boxes.append(batch.crop_boxes)
    records = pose_records(box_set.boxes, np.concatenate(ids), np.concatenate(kpts), np.concatenate(crop_boxes))
    return json.dumps(rescore_and_nms(records)).encode()  # as runner.outputs.write_results


def journalled_box_ids(out: Path) -> list[int]:
    """Every box id in OUT's journal, repeats kept: a box computed twice shows twice."""
    ids: list[int] = []
    for path in sorted((out / "journal").glob("shard-*.npz")):
        with np.load(path) as z:
            ids += z["box_ids"].tolist()
    return ids


def wait_for(predicate, timeout: float = 120, what: str = "condition"):
    """Poll ``predicate`` every 20 ms until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def shards_landed(out: Path) -> int:
    return len(list((out / "journal").glob("shard-*.npz")))


def read_devices(out: Path) -> list[dict] | None:
    """OUT/devices.json once the driver has written it (atomically), else None."""
    path = out / "devices.json"
    return json.loads(path.read_text()) if path.exists() else None


def check_throughput(out: Path, boxes: int) -> dict:
    """Per-device boxes and crops add up to the totals; returns throughput.json."""
    tp = json.loads((out / "throughput.json").read_text())
    assert sum(d["boxes"] for d in tp["devices"]) == tp["totals"]["boxes"]
    assert sum(d["crops"] for d in tp["devices"]) == tp["totals"]["crops"]
    assert tp["totals"]["boxes"] + tp["totals"].get("resumed_boxes", 0) == boxes
    return tp


def fake_npu_env(base: dict[str, str], logs: Path, api: str = "new", soc: str = "Ascend310P3") -> dict[str, str]:
    """``base`` with the fake Ascend tools first on PATH and PYTHONPATH, logging to ``logs``/{acl,atc}.jsonl.

    Ray's actor processes inherit this environment, so every actor sees the fakes.
    """
    return dict(base, PATH=f"{FAKES / 'bin'}{os.pathsep}{base['PATH']}",
                PYTHONPATH=os.pathsep.join([str(FAKES), str(REPO)]), FAKE_AIS_BENCH_API=api,
                FAKE_ASCEND_SOC=soc, FAKE_ACL_LOG=str(logs / "acl.jsonl"), FAKE_ATC_LOG=str(logs / "atc.jsonl"))


def fake_cann_toolkit(root: Path, version: str = "8.0.RC1") -> Path:
    """A CANN-like ``root/compiler/bin/atc`` running the fake atc, beside ``root/compiler/version.info``
    (``tasks.atc.atc_version`` reads ``version``); a ``root/mode`` file sets FAKE_ATC_MODE for the next
    run (default success). Returns the ``bin`` folder, to put on a PATH."""
    bin_dir = root / "compiler" / "bin"
    bin_dir.mkdir(parents=True)
    (root / "compiler" / "version.info").write_text(f"Version={version}\n")
    atc = bin_dir / "atc"
    atc.write_text(f"#!/bin/sh\nFAKE_ATC_MODE=$(cat '{root}/mode' 2>/dev/null || echo success) "
                   f"exec {sys.executable} '{FAKES / 'bin' / 'atc'}' \"$@\"\n")
    atc.chmod(0o755)
    return bin_dir


def logged(path: Path) -> list:
    """The JSON lines a fake wrote: one argv per atc run, one record per opened session."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_one_session_per_actor(sessions: list[dict], model_suffix: str) -> None:
    """Each actor opened one session, on device 0 of its own visible NPU (spec ascend.md §4.3)."""
    assert sorted(s["visible"] for s in sessions) == ["0", "1"]
    assert {s["device_id"] for s in sessions} == {0} and len({s["pid"] for s in sessions}) == 2
    assert all(s["model"].endswith(model_suffix) for s in sessions)


@contextmanager
def private_ray(module) -> Iterator[None]:
    """A private Ray (2 CPUs) for a test module whose own functions and classes travel by value."""
    import ray

    ray.cloudpickle.register_pickle_by_value(module)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()
