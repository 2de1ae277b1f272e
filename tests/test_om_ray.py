"""The whole CLI with `--backend om` on two fake NPUs, against `--backend onnxruntime --devices cpu`.

A fake `npu-smi` (a 300I Duo: two 310P3 chips) and the fake `atc` are on PATH, the
fake ais_bench/aclruntime on PYTHONPATH; Ray's actor processes inherit both. The
driver exports a static-batch ONNX of a seeded random FastPose, converts it with the
fake atc, and each {"NPU": 1} actor opens InferSession(0, om), which runs that ONNX
with ONNX Runtime. Keypoints must equal the ONNX Runtime backend's exactly, on the
ais_bench builds the fakes model (tests/fakes/ais_bench/infer/interface.py): their
timing forms differ, one has no mode table, and in the 2023 ones before 2023-09-11 the
session's context belongs to the thread that made it. Each test's models dir starts with the session's ONNX exports
hard-linked (conftest.py ``exported``) and no OM, so every ATC run it counts is its own.
"""
import json
import math
import os
import sys

import pytest

from ray_support import assert_one_session_per_actor, at_once, cli_env, fake_npu_env, logged, run_cli
from tasks.variant import Variant
from tasks.export import ExportOptions

pytest.importorskip("ray")

RUNNER = [sys.executable, "-m", "runner"]
EXEC_MS = 1.25  # what the fake records for every execution (FAKE_ACL_EXEC_MS)
BS = 4


#: What the runs here open: ONNX Runtime's default on a CPU (uint8 input, dynamic batch) and
#: the static-batch exports ATC converts (on an NPU uint8 input is off unless asked for).
ORT = ExportOptions(variant=Variant(uint8_input=True))


def static_batch(bs: int, variant: Variant = Variant()) -> ExportOptions:
    return ExportOptions(batch_size=bs, variant=variant)


@pytest.fixture(scope="module")
def onnxruntime_run(tmp_path_factory, exported) -> dict:
    """The reference run, and the models dir and conversion log the OM runs share (one ATC run)."""
    root = tmp_path_factory.mktemp("om-ray")
    models = exported(root / "models", ORT, static_batch(BS))
    # 18 boxes, bs 4: shards of one batch spread over both devices, and a short last batch (2 boxes).
    common = ["--synthetic", "18", "--bs", str(BS), "--shard-size", str(BS), "--models-dir", str(models),
              "--quiet"]
    run_cli([*RUNNER, *common, "--devices", "cpu", "--backend", "onnxruntime", "--out", str(root / "ort")],
            cli_env(), root)
    return {"common": common, "atc_log": root / "atc.jsonl",
            "keypoints": json.loads((root / "ort" / "keypoints.json").read_text())}


@pytest.mark.parametrize("api", ["new", "ait-nomodes", "old"])
def test_om_on_two_fake_npus_equals_onnxruntime_on_cpu(onnxruntime_run, tmp_path, api):
    """With RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES set, as `ray job submit` drivers have it:
    the private Ray starts without it, so each worker still opens its own chip."""
    freed = tmp_path / "freed"
    freed.mkdir()
    npu_env = dict(fake_npu_env(cli_env(), tmp_path, api=api), FAKE_ACL_EXEC_MS=str(EXEC_MS),
                   FAKE_ATC_LOG=str(onnxruntime_run["atc_log"]), FAKE_ACL_FREE_DIR=str(freed),
                   RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES="1")
    out = tmp_path / "om"
    run_cli([*RUNNER, *onnxruntime_run["common"], "--devices", "0,1", "--backend", "om", "--out", str(out)],
            npu_env, tmp_path)
    # Each worker's close() ran at the end and unloaded its model (free_resource where the build has it,
    # else the session's destruction): a killed worker would have left no record.
    workers = json.loads((out / "devices.json").read_text())
    records = [json.loads(p.read_text()) for p in freed.iterdir()]
    assert sorted(r["pid"] for r in records) == sorted(d["pid"] for d in workers)
    assert {r["how"] for r in records} == {"free_resource" if api == "new" else "destroyed"}
    # The fake recorded the chip each session opened; devices.json says the same.
    sessions = logged(tmp_path / "acl.jsonl")
    assert sorted(s["chip"] for s in sessions) == [0, 1]
    assert sorted((d["device"], d["chip"]) for d in workers) == [("npu:0", 0), ("npu:1", 1)]
    assert {s["pid"]: s["chip"] for s in sessions} == {d["pid"]: d["chip"] for d in workers}

    om = json.loads((out / "keypoints.json").read_text())
    assert len(om) == 18 and om == onnxruntime_run["keypoints"]

    (argv,) = logged(onnxruntime_run["atc_log"])  # converted once, for every generation
    assert "--input_shape=image:4,3,256,192" in argv and "--soc_version=Ascend310P3" in argv
    assert_one_session_per_actor(logged(tmp_path / "acl.jsonl"), "-Ascend310P3-b4.om")
    devices = json.loads((out / "throughput.json").read_text())["devices"]
    assert sorted(d["id"] for d in devices) == ["npu:0", "npu:1"]
    if api == "new":
        check_bundle(out, npu_env, tmp_path)
    assert sum(d["crops"] for d in devices) == 36  # padding rows are not counted
    for d in devices:  # two calls per batch (flip test), each one execution; warm-up not counted
        calls = 2 * math.ceil(d["boxes"] / BS)
        # durations (2023) are exact; (start, end) float32 stamps differ by ~1e-4 ms
        assert d["boxes"] > 0 and d["device_seconds"] == pytest.approx(calls * EXEC_MS / 1000, rel=1e-4)
    assert sum(d["device_seconds"] for d in devices) == pytest.approx(10 * EXEC_MS / 1000, rel=1e-4)


def check_bundle(out, env: dict, tmp_path) -> None:
    """`runner doctor --bundle` after the run: the checklist's files, and no secret in any of them."""
    import tarfile

    secret = "ray-token-5f1c0ffee"  # as `export RAY_AUTH_TOKEN=...` would leave it in the shell
    bundle = tmp_path / "bundle.tar.gz"
    proc = run_cli([*RUNNER, "doctor", "--bundle", str(bundle), "--out", str(out)],
                   dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secret), tmp_path)
    with tarfile.open(bundle) as tar:
        files = {m.name.removeprefix("runner-bundle/"): tar.extractfile(m).read() for m in tar.getmembers()}
    print("bundle:", sorted(files))
    om = json.loads((out / "run.json").read_text())["model_path"].rsplit("/", 1)[1].removesuffix(".om")
    assert sorted(files) == sorted(["MANIFEST.txt", "doctor.txt", "npu-smi-info.txt", "npu-smi-info-m.txt",
                                    "versions.json", "ais_bench.json", "last-run/run.json", "last-run/devices.json",
                                    f"last-run/models/{om}.json", f"last-run/models/{om}.atc.log"])
    assert f"wrote {bundle}: MANIFEST.txt, ais_bench.json, doctor.txt" in proc.stdout
    assert all(secret.encode() not in data and b"RAY_AUTH" not in data for data in files.values())
    assert b"npu-smi info -m agrees" in files["doctor.txt"] and b"Chip Logic ID" in files["npu-smi-info-m.txt"]
    assert json.loads(files["ais_bench.json"])["mode_table"] is True
    assert json.loads(files["last-run/run.json"]) == json.loads((out / "run.json").read_text())


def test_fused_flip_uint8_om_on_fake_npus_equals_plain_onnxruntime(tmp_path, exported):
    """The fast variant through ATC and ais_bench: NHWC uint8 input (ND), one call per batch."""
    models = exported(tmp_path / "models", ORT, static_batch(4, Variant(fused_flip=True, uint8_input=True)))
    common = ["--synthetic", "10", "--bs", "4", "--shard-size", "4", "--models-dir", str(models), "--quiet"]
    base = cli_env()
    npu_env = fake_npu_env(base, tmp_path, api="old")

    at_once(lambda: run_cli([*RUNNER, *common, "--devices", "0,1", "--backend", "om", "--fused-flip", "--uint8-input",
                             "--precision-mode", "must_keep_origin_dtype", "--out", str(tmp_path / "om")],
                            npu_env, tmp_path),
            lambda: run_cli([*RUNNER, *common, "--devices", "cpu", "--backend", "onnxruntime",
                             "--out", str(tmp_path / "ort")], base, tmp_path))

    om = json.loads((tmp_path / "om" / "keypoints.json").read_text())
    assert len(om) == 10 and om == json.loads((tmp_path / "ort" / "keypoints.json").read_text())
    (argv,) = logged(tmp_path / "atc.jsonl")
    assert "--input_shape=image:4,256,192,3" in argv and "--input_format=ND" in argv
    assert "--precision_mode=must_keep_origin_dtype" in argv  # its own OM, keyed by the mode
    run = json.loads((tmp_path / "om" / "run.json").read_text())
    assert run["plan"]["precision_mode"] == run["config"]["precision_mode"] == "must_keep_origin_dtype"
    assert run["model_path"].endswith("-Ascend310P3-b4-must_keep_origin_dtype.om")
    totals = json.loads((tmp_path / "om" / "throughput.json").read_text())["totals"]
    assert totals["bytes_to_device_per_box"] == 256 * 192 * 3  # uint8, the mirror made on the device
    assert totals["bytes_from_device_per_box"] == 17 * 64 * 48 * 4  # merged heatmaps only
    assert totals["crops"] == 20


SWEEP = (4, 8)


def test_dynamic_batch_sweep_converts_once_selects_each_gear_and_equals_static(tmp_path, exported):
    """``--om-batch dynamic`` over two batch sizes on an ais_bench without a mode table (ait before
    2023-09-08, where 'dymbatch' is silently ignored): one ATC run (gears 4,8), one session per actor
    kept across the sweep, every call at its run's gear, and each bs's keypoints the static OM sweep's."""
    from itertools import groupby

    models = exported(tmp_path / "models", ExportOptions(), *(static_batch(bs) for bs in SWEEP))
    common = ["--synthetic", "10", "--bs", ",".join(map(str, SWEEP)), "--shard-size", "4",
              "--models-dir", str(models), "--devices", "0,1", "--backend", "om", "--quiet"]
    logs = {kind: tmp_path / kind for kind in ("static", "dynamic")}

    def sweep(kind: str):
        where = logs[kind]
        where.mkdir()
        env = dict(fake_npu_env(cli_env(), where, api="ait-nomodes" if kind == "dynamic" else "new"),
                   FAKE_ACL_RUN_LOG=str(where / "runs.jsonl"))
        return run_cli([*RUNNER, *common, "--om-batch", kind, "--out", str(where / "out")], env, tmp_path)

    at_once(lambda: sweep("static"), lambda: sweep("dynamic"))  # distinct OM files, logs and OUTs

    static_argv, dynamic_argv = logged(logs["static"] / "atc.jsonl"), logged(logs["dynamic"] / "atc.jsonl")
    assert [next(a for a in argv if a.startswith("--input_shape=")) for argv in static_argv] == \
        [f"--input_shape=image:{bs},3,256,192" for bs in SWEEP]
    (argv,) = dynamic_argv  # converted once for the whole sweep
    assert "--input_shape=image:-1,3,256,192" in argv and "--dynamic_batch_size=4,8" in argv
    assert_one_session_per_actor(logged(logs["dynamic"] / "acl.jsonl"), "-Ascend310P3-g4_8.om")

    calls = logged(logs["dynamic"] / "runs.jsonl")
    assert {c["dynamic"] for c in calls} == {True} and len({c["model"] for c in calls}) == 1
    for pid in {c["pid"] for c in calls}:  # each actor ran the sweep's gears in its order, warm-up included
        assert [gear for gear, _ in groupby(c["batch"] for c in calls if c["pid"] == pid)] == list(SWEEP)
    assert {c["batch"] for c in logged(logs["static"] / "runs.jsonl")} == set(SWEEP)

    for bs in SWEEP:
        dynamic = json.loads((logs["dynamic"] / "out" / f"bs{bs}" / "keypoints.json").read_text())
        static = json.loads((logs["static"] / "out" / f"bs{bs}" / "keypoints.json").read_text())
        assert len(dynamic) == 10 and dynamic == static
        run = json.loads((logs["dynamic"] / "out" / f"bs{bs}" / "run.json").read_text())
        assert run["config"]["om_batch"] == "dynamic" and run["plan"]["om_gears"] == list(SWEEP)


def test_a_failed_open_ends_its_error_line_with_what_aclruntime_printed(onnxruntime_run, tmp_path):
    """aclruntime prints the reason on fd 1 and raises only a code; Ray keeps workers' output from the
    driver (log_to_driver=False), so the worker captures it while the session opens and the line ends with it."""
    printed = "load model from file failed, model file is /models/fastpose-b4.om"
    env = dict(fake_npu_env(cli_env(), tmp_path), FAKE_ACL_OPEN_ERROR=printed,
               FAKE_ATC_LOG=str(onnxruntime_run["atc_log"]))
    out = tmp_path / "out"
    proc = run_cli([*RUNNER, *onnxruntime_run["common"], "--devices", "0", "--backend", "om", "--out", str(out)],
                   env, tmp_path, check=False)
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    print(line)
    assert proc.returncode != 0 and line.startswith("error: a device worker failed to start: om backend: "
                                                    "InferSession(0, "), line
    assert line.endswith(f"[1][ACL:invalid parameter]; check `npu-smi info` for a busy or unhealthy device and the "
                         f"OM's soc_version (its .json) against this chip; aclruntime printed: [ERROR] {printed}"), line
    assert not (out / "journal").exists() or not list((out / "journal").glob("shard-*"))


def test_two_workers_on_one_chip_stop_the_run_before_any_shard(onnxruntime_run, tmp_path, monkeypatch):
    """Two Ray nodes on one host, one NPU each: Ray gives each worker its node's NPU 0, the same chip.
    The pool sees both report chip 0 on one host and stops the run with one line, before any shard."""
    from ray.cluster_utils import Cluster

    env = fake_npu_env(cli_env(), tmp_path)
    for key in ("PATH", "PYTHONPATH", "FAKE_AIS_BENCH_API", "FAKE_ASCEND_SOC", "FAKE_ACL_LOG"):
        monkeypatch.setenv(key, env[key])  # the nodes' workers inherit the fakes from this process
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"NPU": 1}})
    try:
        cluster.add_node(num_cpus=1, resources={"NPU": 1})
        cluster.wait_for_nodes()
        out = tmp_path / "out"
        # The cluster's auth settings: an earlier ray.init() in this process leaves RAY_AUTH_MODE=token
        # behind, and the cluster started here inherits it; the joining command needs the same.
        auth = {k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH")}
        proc = run_cli([*RUNNER, *onnxruntime_run["common"], "--devices", "all", "--backend", "om",
                        "--soc-version", "Ascend310P3", "--address", cluster.address, "--out", str(out)],
                       dict(env, FAKE_ATC_LOG=str(onnxruntime_run["atc_log"]), **auth), tmp_path, check=False)
    finally:
        cluster.shutdown()
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    print(line)
    assert proc.returncode != 0 and line.startswith("error: two device workers opened one NPU (chip 0 on "), line
    sessions = logged(tmp_path / "acl.jsonl")
    assert [s["chip"] for s in sessions] == [0, 0] and len({s["pid"] for s in sessions}) == 2
    assert f"pids {', '.join(str(p) for p in sorted(s['pid'] for s in sessions))})" in line
    assert not (out / "journal").exists() or not list((out / "journal").glob("shard-*"))
