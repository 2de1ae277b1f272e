"""OmBackend, and the Worker that owns it, against the fake ais_bench (tests/fakes) in the builds users have.

``new`` (2024+ source: pairs, ``summary()``, per-call context), ``ait-pairs`` (ait
2023-10-09: pairs but ``sumary()``), ``ait`` (2023-09-11: durations, mode table,
``free_resource``, per-call context), ``ait-nomodes`` (before 2023-09-04: ``out_array``
but no mode table, thread-bound context) and ``old`` (2023 Ascend/tools: durations, no
``out_array``, no ``free_resource``); docs/ascend.md#ais_bench-sessions, spec ascend.md §1, §6.
The fake session runs the ONNX behind a fake OM with ONNX Runtime, so
heatmaps are compared with ONNX Runtime's on the same crops. A tiny model with
FastPose's input and output names and shapes (AvgPool 4x4 + 1x1 conv 3->17) keeps
this fast; the numerics of the real FastPose do not matter here.
"""
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tasks.backends import BackendUnavailable, open_backend
from tasks.backends.om import OmBackend, execution_ms
from tasks.backends.sessions import PATH_DEPTH_MAX, OmModelError

FAKES = Path(__file__).resolve().parent / "fakes"
B = 4  # the static OM's batch
GEARS = [1, 2, 4, 8]


def _drop_fake_modules() -> None:
    for name in [m for m in sys.modules if m == "aclruntime" or m.split(".")[0] == "ais_bench"]:
        del sys.modules[name]


APIS = ["new", "ait-pairs", "ait", "ait-nomodes", "old"]
PAIRS = ("new", "ait-pairs")  # exec_time_list of (start, end) pairs
PER_CALL_CONTEXT = ("new", "ait-pairs", "ait")  # free_resource, and the context made current on every call


@pytest.fixture(params=APIS)
def api(request, monkeypatch):
    """The fake ais_bench of one API version importable as `ais_bench`; removed afterwards."""
    monkeypatch.setenv("FAKE_AIS_BENCH_API", request.param)
    for var in ("FAKE_ASCEND_SOC", "FAKE_ACL_CONTEXT", "FAKE_ACL_EXEC_MS", "FAKE_ACL_LOG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.syspath_prepend(str(FAKES))
    _drop_fake_modules()
    yield request.param
    _drop_fake_modules()


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.AvgPool2d(4), nn.Conv2d(3, 17, 1)).eval()
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 256, 192),), str(path), input_names=["image"],
                      output_names=["heatmaps"], dynamic_axes={"image": {0: "n"}, "heatmaps": {0: "n"}},
                      opset_version=11, dynamo=False)
    return path


@pytest.fixture(scope="session")
def oms(tiny_onnx, tmp_path_factory) -> dict[str, Path]:
    """Static OMs of batch 4 (the main one), 1, 2 and 8, and a dynamic-batch one (gears 1,2,4,8), by the fake atc."""
    from tasks.atc import convert_to_om

    models = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{FAKES / 'bin'}{os.pathsep}{os.environ['PATH']}")
        return {"static": convert_to_om(tiny_onnx, models, "Ascend310P3", batch_size=B),
                **{f"b{n}": convert_to_om(tiny_onnx, models, "Ascend310P3", batch_size=n) for n in (1, 2, 8)},
                "dynamic": convert_to_om(tiny_onnx, models, "Ascend310P3", gears=GEARS)}


def crops(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 256, 192)).astype(np.float32)


def reference(onnx: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]


def message(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("n", [1, B - 1, B])
def test_static_om_pads_the_short_batch_and_drops_the_padding(api, oms, tiny_onnx, n):
    backend = OmBackend(str(oms["static"]), "npu:0", B, 1)
    x = crops(n)
    heatmaps, seconds = backend.run(x)
    assert heatmaps.dtype == np.float32 and heatmaps.shape == (n, 17, 64, 48)
    np.testing.assert_allclose(heatmaps, reference(tiny_onnx, x), rtol=0, atol=1e-6)
    assert seconds > 0
    backend.close()


@pytest.mark.parametrize("om", ["static", "dynamic"])
def test_heatmaps_written_into_the_callers_memory_are_the_same_and_outlive_the_next_call(api, oms, tiny_onnx, om):
    """``run(x, out)``: where the build hands out its tensors, the one copy to the host lands in ``out``
    (a worker's shared slot); without ``out`` the heatmaps are the caller's own, not the session's buffer."""
    backend = OmBackend(str(oms[om]), "npu:0", B, 1)
    assert backend._tensors == (api != "old")  # the 2023 mirror's infer has no out_array
    x, other = crops(B - 1, seed=1), crops(B - 1, seed=2)
    out = np.full((B - 1, 17, 64, 48), np.nan, np.float32)
    got, _ = backend.run(x, out)
    assert got is out
    kept, _ = backend.run(x)
    backend.run(other, np.empty_like(out))  # the session's buffers hold another batch now
    np.testing.assert_allclose(out, reference(tiny_onnx, x), rtol=0, atol=1e-6)
    assert np.array_equal(kept, out)
    backend.close()


def test_more_crops_than_the_batch_is_a_caller_bug(api, oms):
    backend = OmBackend(str(oms["static"]), "npu:0", B, 1)
    with pytest.raises(ValueError, match=f"got {B + 1} crops; it takes 1..{B}"):
        backend.run(crops(B + 1))
    backend.close()


@pytest.mark.parametrize("bs, n, gear", [(8, 1, 8), (8, 5, 8), (8, 8, 8), (3, 1, 4), (3, 3, 4), (1, 1, 1)])
def test_dynamic_batch_om_runs_every_call_at_the_gear_of_its_bs(api, oms, tiny_onnx, bs, n, gear, tmp_path,
                                                                 monkeypatch):
    """The gear is the smallest that holds --bs, and a short batch is padded up to it, as a static OM's is:
    the run computes and measures what the static OM of its batch size does."""
    monkeypatch.setenv("FAKE_ACL_RUN_LOG", str(tmp_path / "runs.jsonl"))
    backend = OmBackend(str(oms["dynamic"]), "npu:0", bs, 1)
    assert backend.gears == tuple(GEARS) and backend.gear == gear  # gears from the sidecar convert_to_om wrote
    x = crops(n, seed=n)
    heatmaps, seconds = backend.run(x)
    assert heatmaps.shape == (n, 17, 64, 48)
    np.testing.assert_allclose(heatmaps, reference(tiny_onnx, x), rtol=0, atol=1e-6)
    assert seconds > 0
    (desc,) = backend.session.get_inputs()
    assert desc.shape[0] == -1 and desc.realsize == gear * 3 * 256 * 192 * 4  # the gear that ran
    backend.close()
    assert [r["batch"] for r in _lines(tmp_path / "runs.jsonl")] == [gear]


def test_setting_batch_size_selects_another_gear_of_the_same_model(api, oms, tiny_onnx, tmp_path, monkeypatch):
    """A sweep's next batch size on a dynamic OM: the session stays, only the gear changes."""
    monkeypatch.setenv("FAKE_ACL_RUN_LOG", str(tmp_path / "runs.jsonl"))
    backend = OmBackend(str(oms["dynamic"]), "npu:0", 2, 1)
    session = backend.session
    for bs in (2, 8, 4):
        backend.batch_size = bs
        x = crops(bs - 1 or 1, seed=bs)
        np.testing.assert_allclose(backend.run(x)[0], reference(tiny_onnx, x), rtol=0, atol=1e-6)
    assert backend.session is session
    with pytest.raises(OmModelError, match=r"--bs 16 but OM .* has batch gears \[1, 2, 4, 8\]"):
        backend.batch_size = 16
    assert backend.batch_size == 4 and backend.gear == 4  # a refused size changes nothing
    backend.close()
    assert [r["batch"] for r in _lines(tmp_path / "runs.jsonl")] == [2, 8, 4]


def test_fake_refuses_a_batch_that_is_not_a_gear(api, oms, capfd):
    """As aclruntime does: a dynamic-batch OM runs only at one of its gears, in every API version."""
    from ais_bench.infer.interface import InferSession

    session = InferSession(0, str(oms["dynamic"]))
    with pytest.raises(RuntimeError, match="invalid parameter"):
        session.set_dynamic_batchsize(3)
    if api != "old":
        with pytest.raises(RuntimeError, match="invalid parameter"):
            session.infer([crops(3)], "dymbatch")
    with pytest.raises(RuntimeError, match="invalid parameter"):  # no gear selected: a static call cannot run
        session.infer([crops(4)], "static")
    out = capfd.readouterr().out  # aclruntime prints on fd 1 (printf)
    assert "set dynamic batch size 3 failed: gears [1, 2, 4, 8]" in out and "no batch gear selected" in out


def _lines(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dynamic_batch_gears_can_be_given_when_the_sidecar_is_gone(api, oms, tmp_path, tiny_onnx):
    om = tmp_path / "copy.om"
    om.write_bytes(oms["dynamic"].read_bytes())
    with pytest.raises(OmModelError, match=r"copy.om has a dynamic batch but .*copy.json lists no gears"):
        OmBackend(str(om), "npu:0", 8, 1)
    backend = OmBackend(str(om), "npu:0", 8, 1, gears=GEARS)
    x = crops(6)
    np.testing.assert_allclose(backend.run(x)[0], reference(tiny_onnx, x), rtol=0, atol=1e-6)
    backend.close()


def test_device_seconds_are_each_calls_executions_in_every_timing_form(api, oms, monkeypatch):
    """Durations (2023) and (start, end) pairs (2024) alike; the list is read once per call and cleared."""
    monkeypatch.setenv("FAKE_ACL_EXEC_MS", "1.25")  # every execution is recorded as 1.25 ms
    backend = OmBackend(str(oms["static"]), "npu:0", B, 1)
    summary = getattr(backend.session, "summary" if api == "new" else "sumary")
    got = []
    for _ in range(3):
        got.append(backend.run(crops(2))[1])
        assert summary().exec_time_list == []  # reset after the read
    if api in PAIRS:  # float32 stamps since the session started: their difference is exact to ~1e-4 ms
        assert got == pytest.approx([1.25e-3] * 3, rel=1e-4)
    else:  # float32 durations: 1.25 is exact
        assert got == [1.25e-3] * 3
    backend.close()


def test_exec_time_list_is_float32_in_the_form_of_its_generation(api, oms):
    from ais_bench.infer.interface import InferSession

    session = InferSession(0, str(oms["static"]))
    session.infer([crops(B)])
    summary = getattr(session, "summary" if api == "new" else "sumary")()
    (entry,) = summary.exec_time_list
    values = list(entry) if api in PAIRS else [entry]
    assert isinstance(entry, tuple) == (api in PAIRS) and all(float(np.float32(v)) == v for v in values)
    assert summary.exec_time_list is not summary.exec_time_list  # def_readwrite: a new list per read


def test_execution_ms_sums_both_forms_in_float64():
    assert execution_ms([]) == 0.0
    assert execution_ms([1.25, 0.5]) == 1.75  # durations (before ais_bench 2024-02)
    # pairs since session start; 8388608 ms (2.3 h) is where float32 stamps step by 1 ms
    assert execution_ms([(10.0, 11.25), (8388608.0, 8388609.0)]) == 2.25
    assert execution_ms([(np.float32(3.5), np.float32(4.0))]) == 0.5


def test_summary_reads_stay_constant_over_10000_calls(api, oms):
    """A read of exec_time_list copies the whole list: read and reset per call, it stays one entry long.

    The time of one read (the backend's read-and-reset, min of 50 reads: robust to
    a busy host) after 10,000 calls must be within 2x of the first reads'.
    """
    backend = OmBackend(str(oms["b1"]), "npu:0", 1, 1)
    reads: list[float] = []
    take = backend._take_exec_ms

    def timed() -> float:
        t0 = time.perf_counter()
        ms = take()
        reads.append(time.perf_counter() - t0)
        return ms

    backend._take_exec_ms = timed
    x = crops(1)
    for _ in range(10_000):
        backend.run(x)
    first, last = min(reads[:50]), min(reads[-50:])
    print(f"{api}: one read {first * 1e6:.2f} us at the start, {last * 1e6:.2f} us after 10,000 calls")
    assert len(reads) == 10_000 and last <= 2 * first
    # The measure sees an O(n) read: the same list 10,000 entries long reads far slower than 1 entry.
    summary = getattr(backend.session, backend._summary_name)()
    entry = (0.0, 1.0) if api in PAIRS else 1.0
    assert _min_read(summary, [entry] * 10_000) > 2 * _min_read(summary, [entry])
    backend.close()


def _min_read(summary, entries: list) -> float:
    summary.exec_time_list = entries  # def_readwrite: assigning replaces the C++ vector
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        summary.exec_time_list
        times.append(time.perf_counter() - t0)
    return min(times)


def test_non_contiguous_crops_are_fed_contiguous(api, oms, tiny_onnx):
    """A mirrored view (negative stride) would be read as raw memory by aclruntime."""
    backend = OmBackend(str(oms["static"]), "npu:0", B, 1)
    x = crops(B)[..., ::-1]
    np.testing.assert_allclose(backend.run(x)[0], reference(tiny_onnx, x.copy()), rtol=0, atol=1e-6)
    backend.close()


def test_device_id_is_a_python_int(api, oms):
    from ais_bench.infer.interface import InferSession

    with pytest.raises(TypeError, match="is not a integer"):
        InferSession(np.int64(0), str(oms["static"]))  # what the fake (and ais_bench >= 2024-09) rejects
    backend = OmBackend(str(oms["static"]), "npu:3", B, 1)
    assert type(backend.session.device_id) is int and backend.session.device_id == 3
    backend.close()


def test_fake_is_strict_about_feeds(api, oms, capfd):
    """The contract the backend keeps: a list, float32, exactly the model's bytes."""
    from ais_bench.infer.interface import InferSession

    session = InferSession(0, str(oms["static"]))
    x = crops(B)
    with pytest.raises(ValueError if api == "new" else RuntimeError):
        session.infer((x,))
    with pytest.raises(RuntimeError, match="general failure"):
        session.infer([x[:B - 1]])
    assert f"check i:0 name:image in size:{(B - 1) * x[0].nbytes} needsize:{B * x[0].nbytes} not match" \
        in capfd.readouterr().out
    with pytest.raises(RuntimeError, match="general failure"):
        session.infer([x.astype(np.float64)])
    if api == "ait-nomodes":  # no mode table: an unknown mode is ignored, as the 2023-09-04 source did
        assert len(session.infer([x], "dynamic_batch")) == 1
    else:
        with pytest.raises((RuntimeError, ValueError)):
            session.infer([x], "dynamic_batch")
    assert len(session.infer([x])) == 1
    assert str(session.get_inputs()[0].datatype) == "dtype.float32"


def test_om_batch_must_equal_bs(api, oms):
    with pytest.raises(OmModelError) as e:
        OmBackend(str(oms["static"]), "npu:0", 8, 1)
    assert message(e).startswith(f"--bs 8 but OM {oms['static'].name} was built for batch {B}: ")
    with pytest.raises(OmModelError, match=r"--bs 16 but OM .* has batch gears \[1, 2, 4, 8\]"):
        OmBackend(str(oms["dynamic"]), "npu:0", 16, 1)


def test_symlinked_om_is_refused_with_the_fix(api, oms, tmp_path):
    link = tmp_path / "link.om"
    link.symlink_to(oms["static"])
    with pytest.raises(OmModelError) as e:
        OmBackend(str(link), "npu:0", B, 1)
    assert f"OM model {link} is a symlink" in message(e) and str(oms["static"]) in message(e)
    if api == "new":  # ais_bench itself would refuse it too, less helpfully
        from ais_bench.infer.interface import InferSession

        with pytest.raises(ValueError, match="Please check the error log"):
            InferSession(0, str(link))


def test_writable_om_is_refused_with_chmod(api, oms, tmp_path):
    om = tmp_path / "open.om"
    om.write_bytes(oms["static"].read_bytes())
    om.chmod(0o777)
    with pytest.raises(OmModelError) as e:
        OmBackend(str(om), "npu:0", B, 1)
    assert message(e) == (f"OM model {om} has mode 0o777; ais_bench refuses group/other-writable files "
                          f"(at most 0o755): chmod 644 {om}")
    om.chmod(0o755)
    OmBackend(str(om), "npu:0", B, 1).close()


@pytest.mark.parametrize("name, expected", [("model.onnx", "loads only files ending in .om"),
                                            ("missing.om", "not found"),
                                            ("has space.om", "has characters ais_bench refuses")])
def test_other_model_file_rules(api, oms, tmp_path, name, expected):
    path = tmp_path / name
    if name != "missing.om":
        path.write_bytes(oms["static"].read_bytes())
    with pytest.raises(OmModelError, match=expected):
        OmBackend(str(path), "npu:0", B, 1)


def test_close_unloads_the_model_on_every_api_version(api, oms):
    """2024: free_resource(); 2023 builds have none and unload when the session object dies, so
    close() must leave no reference to it (no bound methods kept)."""
    import aclruntime

    backend = OmBackend(str(oms["static"]), "npu:0", B, 1)
    backend.run(crops(1))
    assert aclruntime.loaded_models() == 1
    session = backend.session
    assert hasattr(session, "free_resource") == (api in PER_CALL_CONTEXT)
    del session
    backend.close()
    backend.close()  # idempotent
    assert backend.session is None and aclruntime.loaded_models() == 0


def test_a_refused_model_is_unloaded_too(api, oms):
    import aclruntime

    with pytest.raises(OmModelError, match="--bs 4 but OM"):
        OmBackend(str(oms["b8"]), "npu:0", B, 1)  # loaded, then its batch refused
    assert aclruntime.loaded_models() == 0


def test_model_path_depth_rule(api, oms, tmp_path):
    """aclruntime (2024-08 on) refuses more than 32 '/' in the absolute path (PATH_DEPTH_MAX)."""
    from ais_bench.infer.interface import InferSession

    base = tmp_path.resolve()
    at_limit = Path(base, *["d"] * (PATH_DEPTH_MAX - 1 - str(base).count("/")), "m.om")
    too_deep = at_limit.parent / "e" / "m.om"
    for om in (at_limit, too_deep):
        om.parent.mkdir(parents=True, exist_ok=True)
        om.write_bytes(oms["static"].read_bytes())
        om.chmod(0o644)
    assert str(at_limit).count("/") == 32 and str(too_deep).count("/") == 33
    OmBackend(str(at_limit), "npu:0", B, 1).close()
    with pytest.raises(OmModelError) as e:
        OmBackend(str(too_deep), "npu:0", B, 1)
    assert message(e) == (f"OM model path {too_deep} has 33 '/' separators; aclruntime refuses more than 32 "
                          "(PATH_DEPTH_MAX): move it higher up, e.g. with --models-dir")
    if api == "new":  # the fake's C++ side refuses it as the real one does
        with pytest.raises(RuntimeError, match="please check model path"):
            InferSession(0, str(too_deep))


def test_fake_context_belongs_to_the_creating_thread_in_2023_builds(api, oms, capfd):
    from ais_bench.infer.interface import InferSession

    session = InferSession(0, str(oms["static"]))
    x = crops(B)
    errors: list[str] = []

    def elsewhere() -> None:
        try:
            session.infer([x])
        except RuntimeError as e:
            errors.append(str(e))

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    if api in PER_CALL_CONTEXT:  # from 2023-09-11 the session's context is made current on every call
        assert errors == []
    else:
        assert errors == ["[107002][fake: no current context]"]
        assert "[ERROR] aclrtMalloc failed, ret=107002" in capfd.readouterr().out
    assert len(session.infer([x])) == 1  # the thread that made it still can


def test_om_built_for_another_soc_fails_to_open(api, oms, monkeypatch):
    monkeypatch.setenv("FAKE_ASCEND_SOC", "Ascend910B4")
    with pytest.raises(BackendUnavailable) as e:
        OmBackend(str(oms["static"]), "npu:0", B, 1)
    assert "InferSession(0, " in message(e) and "soc_version" in message(e)
    # What aclruntime printed on fd 1 while the session opened ends the line.
    assert message(e).endswith("; aclruntime printed: [ERROR] load model from file failed, model file is "
                               f"{oms['static']} (built for Ascend310P3, this chip is Ascend910B4)")


def test_open_backend_table_knows_om(api, oms, tiny_onnx):
    backend = open_backend("om", str(oms["static"]), "npu:0", B, 1)
    x = crops(2)
    np.testing.assert_allclose(backend.run(x)[0], reference(tiny_onnx, x), rtol=0, atol=1e-6)
    backend.close()


def test_not_an_npu_device(api, oms):
    with pytest.raises(BackendUnavailable, match="om backend runs on NPUs"):
        OmBackend(str(oms["static"]), "cpu", B, 1)


def test_without_ais_bench_one_line_says_what_to_install(oms, monkeypatch):
    monkeypatch.setitem(sys.modules, "ais_bench", None)  # import ais_bench -> ImportError
    with pytest.raises(BackendUnavailable) as e:
        OmBackend(str(oms["static"]), "npu:0", B, 1)
    text = message(e)
    assert "install the ais_bench and aclruntime wheels" in text
    # both CANN layouts: ascend-toolkit/ up to 8.3, cann/ from 8.5
    assert ("source /usr/local/Ascend/ascend-toolkit/set_env.sh (or /usr/local/Ascend/cann/set_env.sh on "
            "CANN 8.5+)") in text


# --- the Worker owns its backend on one thread (cluster.actor) ---

def _worker(backend: str, model: Path, bs: int, **config):
    from cluster.actor import Worker, WorkerConfig
    from cluster.worker import WorkerPlace

    device, kind = ("npu:0", "npu") if backend == "om" else ("cpu", "cpu")
    place = WorkerPlace(backend=backend, compute_device=device, label=device, kind=kind, threads=1)
    return Worker(WorkerConfig(place=place, model_path=str(model), batch_size=bs, **config))


@pytest.fixture(scope="module")
def shard(synthetic_coco):
    from cluster.actor import Shard
    from tasks.dataset import load_boxes

    boxes = load_boxes(synthetic_coco["dataroot"], synthetic_coco["dets"])
    return Shard(0, boxes.boxes, boxes.image_paths)


def test_worker_opens_runs_reopens_and_closes_the_session_on_its_device_thread(api, oms, tiny_onnx, shard,
                                                                               monkeypatch):
    """With the context bound to the thread that made the session (2023 builds; forced for `new` too),
    opening in the constructor's thread or reopening in set_batch's would fail the first call."""
    monkeypatch.setenv("FAKE_ACL_CONTEXT", "thread")  # before the fake is imported: it reads it then
    import aclruntime

    reference = _worker("onnxruntime", tiny_onnx, B)
    expected = reference.run_shard(shard)
    reference.close()
    worker = _worker("om", oms["static"], B)
    try:
        assert aclruntime.CONTEXT == "thread" and aclruntime.loaded_models() == 1
        first = worker.run_shard(shard)
        worker.set_batch(str(oms["b2"]), 2)  # a sweep's next batch size: another static OM
        assert aclruntime.loaded_models() == 1
        second = worker.run_shard(shard)
    finally:
        worker.close()
    assert aclruntime.loaded_models() == 0
    for got in (first, second):
        np.testing.assert_array_equal(got.box_ids, expected.box_ids)
        np.testing.assert_array_equal(got.keypoints, expected.keypoints)
    assert first.calls == 2 * 5 and second.calls == 2 * 9  # 18 boxes: batches of 4, then of 2; flip test


def test_a_failed_reopen_leaves_no_model_loaded_and_the_error_raised(api, oms, shard):
    import aclruntime

    worker = _worker("om", oms["static"], B)
    try:
        with pytest.raises(OmModelError, match=f"--bs {B} but OM .*b8.om was built for batch 8"):
            worker.set_batch(str(oms["b8"]), B)
        assert aclruntime.loaded_models() == 0  # the old session closed first, the refused one unloaded
        assert worker.session is None and worker.config.model_path == str(oms["static"])
        with pytest.raises(RuntimeError, match="no open session: the last set_batch failed to open its model"):
            worker.run_shard(shard)
        worker.set_batch(str(oms["static"]), B)  # a later set_batch opens again
        assert len(worker.run_shard(shard).box_ids) == len(shard.boxes)
    finally:
        worker.close()
    assert aclruntime.loaded_models() == 0


def test_a_worker_that_cannot_open_fails_to_start_with_the_backends_error(api, oms):
    with pytest.raises(OmModelError, match="was built for batch 8"):
        _worker("om", oms["b8"], B)


def test_set_batch_replaces_the_dump_dir(tiny_onnx, shard, tmp_path):
    """A sweep with --dump-heatmaps writes each batch size into its own directory."""
    worker = _worker("onnxruntime", tiny_onnx, B, dump_dir=str(tmp_path / "bs4"))
    try:
        worker.run_shard(shard)
        worker.set_batch(str(tiny_onnx), 2, str(tmp_path / "bs2"))
        worker.run_shard(shard)
        worker.set_batch(str(tiny_onnx), 2, None)
        worker.run_shard(shard)
    finally:
        worker.close()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.npz")) == \
        ["bs2/shard-000000.npz", "bs4/shard-000000.npz"]


def test_the_gear_is_selected_by_what_the_session_offers():
    """The mode table decides, never infer()'s parameter names (ait before 2023-09-08 had out_array
    but no mode table and ignored 'dymbatch'; docs/ascend.md#ais_bench-sessions)."""
    from types import SimpleNamespace

    from tasks.backends.om import dymbatch_mode

    assert dymbatch_mode(SimpleNamespace(infer_mode_switch={"static": 0, "dymbatch": 0})) is True
    assert dymbatch_mode(SimpleNamespace(set_dynamic_batchsize=print)) is False
    with pytest.raises(OmModelError, match=r"modes are dymshape, static, no dymbatch: .* --om-batch static"):
        dymbatch_mode(SimpleNamespace(infer_mode_switch={"static": 0, "dymshape": 0}))
    with pytest.raises(OmModelError, match="neither a mode table nor set_dynamic_batchsize"):
        dymbatch_mode(SimpleNamespace())


def test_what_c_code_prints_on_fd_1_and_2_is_captured_and_passed_on(capfd):
    """printf to a file waits in C's stdio buffer: the capture flushes it before reading."""
    import ctypes

    from tasks.backends.sessions import captured_output

    libc = ctypes.CDLL(None)
    with captured_output() as printed:
        libc.printf(b"[ERROR] load model from file failed, model file is m.om\n")
        os.write(2, b"[ERROR] acl open device 0 failed\n")
    text = "".join(printed)
    assert "[ERROR] load model from file failed, model file is m.om" in text
    assert "[ERROR] acl open device 0 failed" in text
    assert "[ERROR] acl open device 0 failed" in capfd.readouterr().out  # passed on to the worker's log


def test_a_failed_call_names_where_aclruntime_printed_its_reason(api, oms, monkeypatch):
    """A call's reason is printed by aclruntime, not raised: the error names this process's stdout file."""
    from tasks.backends.sessions import output_file

    backend = OmBackend(str(oms["static"]), "npu:0", B, 1)

    def failing(*args, **kwargs):
        raise RuntimeError("[1][ACL:general failure]")

    monkeypatch.setattr(backend.session, "infer", failing)
    with pytest.raises(RuntimeError) as e:
        backend.run(crops(2))
    where = output_file() or "this worker's stdout"  # pytest's capture file here, a Ray worker's log in a run
    assert str(e.value) == f"[1][ACL:general failure] (aclruntime's [ERROR] lines: {where})"
    backend.close()
