"""OmBackend against the fake ais_bench (tests/fakes), in both API versions (spec ascend.md §1, §6).

The fake session runs the ONNX behind a fake OM with ONNX Runtime, so heatmaps are
compared with ONNX Runtime's on the same crops. A tiny model with FastPose's input
and output names and shapes (AvgPool 4x4 + 1x1 conv 3->17) keeps this fast; the
numerics of the real FastPose do not matter here.
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.backends import BackendUnavailable, open_backend
from tasks.backends.om import OmBackend, OmModelError

FAKES = Path(__file__).resolve().parent / "fakes"
B = 4  # the static OM's batch
GEARS = [1, 2, 4, 8]


def _drop_fake_modules() -> None:
    for name in [m for m in sys.modules if m == "aclruntime" or m.split(".")[0] == "ais_bench"]:
        del sys.modules[name]


@pytest.fixture(params=["new", "old"])
def api(request, monkeypatch):
    """The fake ais_bench of one API version importable as `ais_bench`; removed afterwards."""
    monkeypatch.setenv("FAKE_AIS_BENCH_API", request.param)
    monkeypatch.delenv("FAKE_ASCEND_SOC", raising=False)
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
    """A static batch-4 OM and a dynamic-batch one (gears 1,2,4,8), made by the fake atc."""
    from tasks.atc import convert_to_om

    models = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{FAKES / 'bin'}{os.pathsep}{os.environ['PATH']}")
        return {"static": convert_to_om(tiny_onnx, models, "Ascend310P3", batch_size=B),
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


def test_more_crops_than_the_batch_is_a_caller_bug(api, oms):
    backend = OmBackend(str(oms["static"]), "npu:0", B, 1)
    with pytest.raises(ValueError, match=f"got {B + 1} crops; it takes 1..{B}"):
        backend.run(crops(B + 1))
    backend.close()


@pytest.mark.parametrize("n, gear", [(1, 1), (3, 4), (4, 4), (5, 8), (8, 8)])
def test_dynamic_batch_om_runs_the_next_gear(api, oms, tiny_onnx, n, gear):
    backend = OmBackend(str(oms["dynamic"]), "npu:0", 8, 1)
    assert backend.gears == tuple(GEARS)  # from the sidecar convert_to_om wrote
    x = crops(n, seed=n)
    heatmaps, seconds = backend.run(x)
    np.testing.assert_allclose(heatmaps, reference(tiny_onnx, x), rtol=0, atol=1e-6)
    assert seconds > 0
    (desc,) = backend.session.get_inputs()
    assert desc.shape[0] == -1 and desc.realsize == gear * 3 * 256 * 192 * 4  # the gear that ran
    backend.close()


def test_dynamic_batch_gears_can_be_given_when_the_sidecar_is_gone(api, oms, tmp_path, tiny_onnx):
    om = tmp_path / "copy.om"
    om.write_bytes(oms["dynamic"].read_bytes())
    with pytest.raises(OmModelError, match=r"copy.om has a dynamic batch but .*copy.json lists no gears"):
        OmBackend(str(om), "npu:0", 8, 1)
    backend = OmBackend(str(om), "npu:0", 8, 1, gears=GEARS)
    x = crops(6)
    np.testing.assert_allclose(backend.run(x)[0], reference(tiny_onnx, x), rtol=0, atol=1e-6)
    backend.close()


def test_device_seconds_are_the_new_exec_time_entries(api, oms):
    backend = OmBackend(str(oms["static"]), "npu:0", B, 1)
    summary = backend.session.summary if api == "new" else backend.session.sumary
    got = [backend.run(crops(2))[1] for _ in range(3)]
    times = summary().exec_time_list
    assert len(times) == 3 and all(end > start >= 0 for start, end in times)
    np.testing.assert_allclose(got, [(end - start) / 1000 for start, end in times])
    backend.close()


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
        in capfd.readouterr().err
    with pytest.raises(RuntimeError, match="general failure"):
        session.infer([x.astype(np.float64)])
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


def test_close_frees_the_session_when_it_can(api, oms, monkeypatch):
    backend = OmBackend(str(oms["static"]), "npu:0", B, 1)
    session = backend.session
    assert hasattr(session, "free_resource") == (api == "new")
    calls = []
    if api == "new":
        free = session.free_resource
        monkeypatch.setattr(session, "free_resource", lambda: (calls.append("free"), free()))
    backend.close()
    backend.close()  # idempotent
    assert calls == (["free"] if api == "new" else [])
    assert backend.session is None
    if api == "new":
        with pytest.raises(RuntimeError):
            session.infer([crops(B)])


def test_om_built_for_another_soc_fails_to_open(api, oms, monkeypatch):
    monkeypatch.setenv("FAKE_ASCEND_SOC", "Ascend910B4")
    with pytest.raises(BackendUnavailable) as e:
        OmBackend(str(oms["static"]), "npu:0", B, 1)
    assert "InferSession(0, " in message(e) and "soc_version" in message(e)


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
    assert "source /usr/local/Ascend/ascend-toolkit/set_env.sh" in text
