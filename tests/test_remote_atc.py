"""cluster/remote_atc.py on a local Ray whose node has the fake `atc` on its PATH and this process has not.

Ray's worker processes take the environment their node started with, so the node
started here with the fake CANN toolkit first on PATH keeps it after this process
drops it: the driver has no `atc`, its one NPU node has. The toolkit
(``ray_support.fake_cann_toolkit``) has a CANN version the test can change, and a ``mode``
file that sets FAKE_ATC_MODE for the next run.
tests/test_two_nodes_harness.py does the same across two real nodes.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from cluster.remote_atc import AtcNode, convert_where_cann_is, npu_nodes  # noqa: E402
from fakes.fake_om import read_fake_om  # noqa: E402
from ray_support import fake_cann_toolkit, logged  # noqa: E402
from tasks.atc import AtcError, convert_to_om, om_stem  # noqa: E402
from tasks.files import file_sha256  # noqa: E402

SOC = "Ascend310P3"


@pytest.fixture(scope="module")
def cann_node(tmp_path_factory):
    """A local Ray with one NPU slot whose node has the fake toolkit on PATH; this process has none."""
    root = tmp_path_factory.mktemp("cann")
    bin_dir = fake_cann_toolkit(root / "toolkit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        mp.setenv("FAKE_ATC_LOG", str(root / "atc.jsonl"))
        mp.setenv("RUNNER_NODE_CACHE", str(root / "node-cache"))
        ray.init(num_cpus=1, resources={"NPU": 1}, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
    assert shutil.which("atc") is None, "the test host has an atc of its own"
    yield {"root": root / "toolkit", "log": root / "atc.jsonl", "node_cache": root / "node-cache"}
    ray.shutdown()


@pytest.fixture
def onnx(tmp_path) -> Path:
    path = tmp_path / "driver" / "pose.onnx"  # the fake atc reads no ONNX: any bytes name one
    path.parent.mkdir()
    path.write_bytes(os.urandom(1 << 20))
    path.with_suffix(".json").write_text('{"export": "as tasks/export.py leaves it"}')
    return path


def output_of(sidecar: dict) -> str:
    """Where the ATC that made an OM wrote it: a node's temporary folder, or one in the models dir."""
    (output,) = [a for a in sidecar["atc"] if a.startswith("--output=")]
    return output


def runs(cann_node) -> int:
    return len(logged(cann_node["log"])) if cann_node["log"].exists() else 0


def test_the_om_is_made_on_the_npu_node_and_lands_where_convert_to_om_puts_it(cann_node, onnx, tmp_path):
    before, models = runs(cann_node), tmp_path / "models"
    lines: list[str] = []
    om = convert_where_cann_is(onnx, models, SOC, batch_size=4, log=lines.append)
    stem = om_stem(onnx, models, SOC, 4)
    assert om == stem.with_name(stem.name + ".om") and runs(cann_node) == before + 1
    assert oct(om.stat().st_mode & 0o777) == "0o644"
    info = json.loads(om.with_suffix(".json").read_text())
    assert info["atc_version"] == "8.0.RC1" and info["onnx"] == str(onnx) and info["batch_size"] == 4
    assert info["onnx_sha256"] == file_sha256(onnx)
    # One host: the node sees the driver's ONNX and converts that file (two_nodes: it is shipped).
    header, embedded = read_fake_om(om)  # the fake OM names the ONNX it was made from, and holds its bytes
    assert header["onnx"] == str(onnx) and embedded == onnx.read_bytes()
    assert "/runner-atc-" in output_of(info) and (models / f"{stem.name}.atc.log").read_text().startswith("# ran on ")
    assert len(lines) == 1 and "atc is not on this host's PATH: converting" in lines[0] and "CANN 8.0.RC1" in lines[0]
    # The same arguments find it cached: nothing runs again, as with convert_to_om.
    assert convert_where_cann_is(onnx, models, SOC, batch_size=4) == om and runs(cann_node) == before + 1


def test_a_dynamic_om_keeps_its_gears_and_another_cann_version_converts_again(cann_node, onnx, tmp_path):
    version = cann_node["root"] / "compiler" / "version.info"
    om = convert_where_cann_is(onnx, tmp_path / "models", SOC, gears=[1, 4, 8])
    assert json.loads(om.with_suffix(".json").read_text())["gears"] == [1, 4, 8]
    before = runs(cann_node)
    version.write_text("Version=8.1.RC1\n")
    try:
        again = convert_where_cann_is(onnx, tmp_path / "models", SOC, gears=[1, 4, 8])
    finally:
        version.write_text("Version=8.0.RC1\n")
    assert again == om and runs(cann_node) == before + 1
    assert json.loads(om.with_suffix(".json").read_text())["atc_version"] == "8.1.RC1"


def test_a_failed_conversion_is_one_line_naming_the_drivers_log(cann_node, onnx, tmp_path):
    mode = cann_node["root"] / "mode"
    mode.write_text("fail")
    try:
        with pytest.raises(AtcError) as error:
            convert_where_cann_is(onnx, tmp_path / "models", SOC, batch_size=2)
    finally:
        mode.unlink()
    message = str(error.value)
    log = tmp_path / "models" / f"{om_stem(onnx, tmp_path / 'models', SOC, 2).name}.atc.log"
    assert "\n" not in message and message.startswith("atc failed (exit status 255) for ")
    assert "E19010: [PID: " in message and f"full output: {log} (atc ran on " in message
    assert "EZ3003" in log.read_text() and not list((tmp_path / "models").glob("*.om"))


def test_local_atc_wins_and_no_atc_anywhere_is_one_line(cann_node, onnx, tmp_path, monkeypatch):
    assert [n["Resources"]["NPU"] for n in npu_nodes()] == [1.0]
    local = fake_cann_toolkit(tmp_path / "local", version="7.0.0")
    monkeypatch.setenv("PATH", f"{local}{os.pathsep}{os.environ['PATH']}")
    om = convert_where_cann_is(onnx, tmp_path / "models", SOC, batch_size=8)
    info = json.loads(om.with_suffix(".json").read_text())
    assert info["atc_version"] == "7.0.0" and "/runner-atc-" not in output_of(info)  # this host's atc made it
    monkeypatch.setenv("PATH", os.environ["PATH"].split(os.pathsep, 1)[1])
    monkeypatch.setattr("cluster.remote_atc.probe_nodes", lambda nodes: [AtcNode("n1", "npu-host", None, None)])
    # Nothing can convert anywhere: a cached OM is used whatever CANN made it, as convert_to_om does.
    assert convert_where_cann_is(onnx, tmp_path / "models", SOC, batch_size=8) == om
    with pytest.raises(AtcError, match=r"^atc not found on PATH on this host nor on the Ray cluster's 1 NPU "
                                       r"node\(s\) \(npu-host\): source .*set_env.sh.* before `ray start` on an "
                                       r"NPU node, or here, or install the CANN toolkit that provides it$"):
        convert_where_cann_is(onnx, tmp_path / "models", SOC, batch_size=16)


def test_without_npu_nodes_it_is_convert_to_om(onnx, tmp_path, monkeypatch):
    monkeypatch.setattr("cluster.remote_atc.npu_nodes", lambda: [])
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(AtcError) as remote:
        convert_where_cann_is(onnx, tmp_path / "models", SOC, batch_size=4)
    with pytest.raises(AtcError) as local:
        convert_to_om(onnx, tmp_path / "models", SOC, batch_size=4)
    assert str(remote.value) == str(local.value) and str(local.value).startswith("atc not found on PATH: source ")
