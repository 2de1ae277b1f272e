"""`runner.doctor` on this CPU host, then with the fakes (npu-smi, atc, ais_bench) standing in for an Atlas host."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.doctor import SET_ENV, doctor, format_doctor

REPO = Path(__file__).resolve().parents[1]
FAKES = REPO / "tests" / "fakes"
ASCEND_MODULES = ("ais_bench", "aclruntime")


def by_name(checks):
    return {c.name: c for c in checks}


def _drop_fake_modules() -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in ASCEND_MODULES]:
        del sys.modules[name]


@pytest.fixture
def bare_host(tmp_path, monkeypatch):
    """No Ascend stack: nothing Ascend on PATH, no CANN variables, ais_bench/aclruntime not importable."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    for var in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH", "ASCEND_RT_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    for name in ASCEND_MODULES:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture
def fake_atlas(tmp_path, monkeypatch):
    """The fakes on PATH and sys.path, and a CANN home as set_env.sh would export it."""
    home = tmp_path / "ascend-toolkit" / "latest"
    home.mkdir(parents=True)
    monkeypatch.setenv("PATH", f"{FAKES / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(home))
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("FAKE_NPU_SMI_INFO", raising=False)
    monkeypatch.setenv("FAKE_AIS_BENCH_API", "new")
    monkeypatch.syspath_prepend(str(FAKES))
    _drop_fake_modules()
    yield home
    _drop_fake_modules()


def test_cpu_host_reports_the_ascend_stack_missing_with_fixes(bare_host):
    checks = by_name(doctor())
    for name, fix in [("npu-smi", "install the Ascend driver"), ("CANN env", f"source {SET_ENV}"),
                      ("atc", f"source {SET_ENV}"), ("ais_bench", "install the ais_bench and aclruntime wheels"),
                      ("aclruntime", "install the ais_bench and aclruntime wheels")]:
        assert not checks[name].ok, checks[name]
        assert fix in checks[name].fix, checks[name]
    assert checks["npu-smi"].detail == "npu-smi not found on PATH"
    assert checks["onnxruntime"].ok and "CPUExecutionProvider" in checks["onnxruntime"].detail
    assert checks["ray"].ok and checks["torch"].ok and checks["python"].ok
    text = format_doctor(list(checks.values()))
    assert "--backend om: not ready (npu-smi, CANN env, atc, aclruntime, ais_bench)" in text
    assert "--backend onnxruntime: ready" in text
    assert f"fix: source {SET_ENV}" in text
    # both CANN layouts are named: ascend-toolkit/ up to 8.3, cann/ from 8.5
    assert "/usr/local/Ascend/ascend-toolkit/set_env.sh" in checks["CANN env"].fix
    assert "/usr/local/Ascend/cann/set_env.sh" in checks["CANN env"].fix
    assert "prebuilt 0.0.2 wheels" in checks["ais_bench"].fix


def test_fake_atlas_host_reports_everything_for_om_ok(fake_atlas):
    checks = by_name(doctor())
    for name in ("npu-smi", "CANN env", "atc", "ais_bench", "aclruntime"):
        assert checks[name].ok, checks[name]
    assert checks["npu-smi"].detail == ("2 NPU(s): ids 0, 1 (Ascend310P3); ATC soc_version Ascend310P3; "
                                        "npu-smi info -m agrees")
    assert checks["npu-smi"].warning == ""
    assert checks["atc"].detail == str(FAKES / "bin" / "atc")
    assert checks["CANN env"].detail == f"ASCEND_TOOLKIT_HOME={fake_atlas}"
    assert ("summary(), reset_summaryinfo(), set_dynamic_batchsize(), finalize(); free_resource: yes; "
            "infer(self, feeds, mode, custom_sizes, out_array); mode table (dymbatch by mode); "
            "exec_time_list entries: (start, end) pairs") in checks["ais_bench"].detail
    assert "--backend om: ready" in format_doctor(list(checks.values()))


#: What the doctor observes in each fake build (tests/fakes): names present, never an era.
OBSERVED = {
    "ait-pairs": "sumary(), reset_sumaryinfo(), set_dynamic_batchsize(), finalize(); free_resource: yes; "
                 "infer(self, feeds, mode, custom_sizes, out_array); mode table (dymbatch by mode); "
                 "exec_time_list entries: (start, end) pairs",
    "ait": "sumary(), reset_sumaryinfo(), set_dynamic_batchsize(), finalize(); free_resource: yes; "
           "infer(self, feeds, mode, custom_sizes, out_array); mode table (dymbatch by mode); "
           "exec_time_list entries: durations",
    "ait-nomodes": "sumary(), reset_sumaryinfo(), set_dynamic_batchsize(), finalize(); free_resource: no; "
                   "infer(self, feeds, mode, custom_sizes, out_array); no mode table (dymbatch by "
                   "set_dynamic_batchsize); exec_time_list entries: durations",
    "old": "sumary(), reset_sumaryinfo(), set_dynamic_batchsize(), finalize(); free_resource: no; "
           "infer(self, feeds, mode, custom_sizes); no mode table (dymbatch by set_dynamic_batchsize); "
           "exec_time_list entries: durations",
}


@pytest.mark.parametrize("api", sorted(OBSERVED))
def test_ais_bench_row_says_what_it_observed(fake_atlas, monkeypatch, api):
    monkeypatch.setenv("FAKE_AIS_BENCH_API", api)
    check = by_name(doctor())["ais_bench"]
    assert check.ok and f"; {OBSERVED[api]} (" in check.detail
    assert "2023" not in check.detail and "2024" not in check.detail


def test_unhealthy_chip_is_a_warning(fake_atlas, tmp_path, monkeypatch):
    """Health Critical on chip 1: the row stays ok (the chip is there), with a warning naming it."""
    from ray_support import FOUR_310P3

    text = tmp_path / "info.txt"
    text.write_text(FOUR_310P3.replace("| 32768   310P3                 | OK      ",
                                       "| 32768   310P3                 | Critical", 1))
    monkeypatch.setenv("FAKE_NPU_SMI_INFO", str(text))
    checks = by_name(doctor())
    check = checks["npu-smi"]
    assert check.ok and check.warning.startswith("npu-smi info reports NPU 0 Health Critical: a run refuses it")
    table = format_doctor(list(checks.values()))
    assert "npu-smi      WARNING  4 NPU(s)" in table and "warning: npu-smi info reports NPU 0" in table
    # The fake's -m lists only two chips: the cross-check says which of the four it lacks.
    assert "npu-smi info -m DISAGREES: card 32769 chip 0 (logical 2) is not in npu-smi info -m" in check.detail


@pytest.mark.parametrize("layout", ["ascend-toolkit", "cann"])
def test_installed_but_unsourced_cann_is_found_in_either_layout(bare_host, monkeypatch, tmp_path, layout):
    import runner.doctor

    scripts = tuple(str(tmp_path / name / "set_env.sh") for name in ("ascend-toolkit", "cann"))
    monkeypatch.setattr(runner.doctor, "SET_ENV_SCRIPTS", scripts)
    check = by_name(doctor())["CANN env"]
    assert not check.ok
    assert check.detail == f"ASCEND_TOOLKIT_HOME is unset and there is no {scripts[0]} nor {scripts[1]}"
    script = tmp_path / layout / "set_env.sh"
    script.parent.mkdir()
    script.write_text("export ASCEND_TOOLKIT_HOME=...\n")
    check = by_name(doctor())["CANN env"]
    assert not check.ok and check.fix == f"source {script}"
    assert check.detail == f"ASCEND_TOOLKIT_HOME is unset: {script} exists but is not sourced in this shell"


def test_npu_smi_failure_is_quoted(fake_atlas, tmp_path, monkeypatch):
    text = tmp_path / "err.txt"
    text.write_text("DrvMngGetConsoleLogLevel failed. (ret=4)\ndcmi module initialize failed. ret is -8005\n")
    monkeypatch.setenv("FAKE_NPU_SMI_INFO", str(text))
    check = by_name(doctor())["npu-smi"]
    assert not check.ok and "dcmi module initialize failed. ret is -8005" in check.detail


def test_sourced_but_missing_toolkit(bare_host, monkeypatch, tmp_path):
    monkeypatch.setenv("ASCEND_HOME_PATH", str(tmp_path / "gone"))
    check = by_name(doctor())["CANN env"]
    assert not check.ok and check.detail == f"ASCEND_HOME_PATH={tmp_path / 'gone'} does not exist"


def test_module_entry_point_in_a_subprocess(tmp_path):
    """The environment a run inherits: PATH and PYTHONPATH carry the fakes to a new process."""
    env = dict(os.environ, PATH=f"{FAKES / 'bin'}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join([str(FAKES), str(REPO)]), ASCEND_TOOLKIT_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "runner.doctor"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--backend om: ready" in out.stdout
