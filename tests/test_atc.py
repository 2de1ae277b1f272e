"""ONNX -> OM: the ATC command line against the spec's recipe, and convert_to_om against a fake `atc`.

`tests/fakes/bin/atc` prints ATC's real start/verdict lines and writes a fake OM;
FAKE_ATC_MODE picks success, suffixed success, failure with E-codes (exit 255),
exit 0 without an OM, or a missing shared library. It logs its argv to FAKE_ATC_LOG.
"""
import json
import os
import shlex
import stat
from pathlib import Path

import pytest

from tasks.atc import SET_ENV, AtcError, atc_command, convert_to_om, om_stem

FAKE_BIN = Path(__file__).resolve().parent / "fakes" / "bin"

# spec ascend.md §3.1 (static) and §3.4 (dynamic batch), as a shell would split them.
SPEC_STATIC = ('atc --framework=5 --model=fastpose_bs16.onnx --output=fastpose_bs16 '
               '--input_format=NCHW --input_shape="image:16,3,256,192" '
               '--soc_version=Ascend310P3 --log=error')
SPEC_DYNAMIC = ('atc --framework=5 --model=fastpose.onnx --output=fastpose_dyn '
                '--input_format=NCHW --input_shape="image:-1,3,256,192" --dynamic_batch_size="1,2,4,8,16" '
                '--soc_version=Ascend310P3 --log=error')


def test_static_command_is_the_published_recipe():
    assert atc_command("fastpose_bs16.onnx", "fastpose_bs16", "Ascend310P3", 16) == shlex.split(SPEC_STATIC)


def test_dynamic_command_has_gears():
    assert atc_command("fastpose.onnx", "fastpose_dyn", "Ascend310P3") == shlex.split(SPEC_DYNAMIC)
    argv = atc_command("fastpose.onnx", "fastpose_dyn", "Ascend310P3", gears=[1, 8, 32])
    assert "--input_shape=image:-1,3,256,192" in argv and "--dynamic_batch_size=1,8,32" in argv


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 16, "gears": [1, 2]}, "gears .* are for a dynamic-batch OM"),
    ({"gears": [4]}, "2 to 100 distinct ascending"),
    ({"gears": [4, 2]}, "2 to 100 distinct ascending"),
    ({"gears": [0, 2]}, "2 to 100 distinct ascending"),
    ({"batch_size": 0}, "positive integer"),
])
def test_bad_batch_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        atc_command("m.onnx", "m", "Ascend310P3", **kwargs)


def test_another_networks_input_name_and_shape():
    # The YOLOv3-SPP detector: input 'input', one 608x608 RGB image (tasks.detector.runtime).
    argv = atc_command("yolov3spp-b1.onnx", "yolov3spp-b1", "Ascend310P3", 1, input_name="input",
                       input_chw=(3, 608, 608))
    default = atc_command("yolov3spp-b1.onnx", "yolov3spp-b1", "Ascend310P3", 1)
    assert argv[5] == "--input_shape=input:1,3,608,608" and default[5] == "--input_shape=image:1,3,256,192"
    assert argv[:5] + argv[6:] == default[:5] + default[6:]  # nothing else changes


def test_output_stem_without_om_suffix():
    with pytest.raises(ValueError, match="without .om"):
        atc_command("m.onnx", "m.om", "Ascend310P3", 1)


# --- convert_to_om with the fake atc

@pytest.fixture
def onnx_file(tmp_path) -> Path:
    path = tmp_path / "fastpose-abc-b16-op11-sim.onnx"
    path.write_bytes(b"the fake atc only checks that the model file exists")
    return path


@pytest.fixture
def fake_atc(tmp_path, monkeypatch):
    """Put the fake atc first on PATH; returns a function that reads the argv it logged."""
    log = tmp_path / "atc-argv.jsonl"
    monkeypatch.setenv("PATH", f"{FAKE_BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ATC_LOG", str(log))
    monkeypatch.delenv("FAKE_ATC_MODE", raising=False)
    return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("mode, suffix", [("success", ""), ("suffix", "_linux_x86_64")])
def test_success_makes_one_plain_om_and_a_sidecar(tmp_path, onnx_file, fake_atc, monkeypatch, mode, suffix):
    monkeypatch.setenv("FAKE_ATC_MODE", mode)
    models = tmp_path / "models"
    om = convert_to_om(onnx_file, models, "Ascend310P3", batch_size=16)
    stem = om_stem(onnx_file, models, "Ascend310P3", 16)
    assert om == stem.parent / f"{stem.name}{suffix}.om"
    st = os.lstat(om)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    info = json.loads(om.with_suffix(".json").read_text())
    assert (info["soc_version"], info["batch_size"], info["gears"]) == ("Ascend310P3", 16, None)
    # ATC ran in a scratch folder that is gone; only the OM, its sidecar and the log remain.
    assert sorted(p.name for p in models.iterdir()) == sorted(
        [om.name, om.with_suffix(".json").name, f"{stem.name}.atc.log"])
    (argv,) = fake_atc()
    expected = atc_command(onnx_file.resolve(), "STEM", "Ascend310P3", 16)[1:]
    output = next(a for a in argv if a.startswith("--output="))
    assert [a for a in argv if a != output] == [a for a in expected if not a.startswith("--output=")]
    assert output.startswith(f"--output={models}/.atc-") and output.endswith(f"/{stem.name}")


def test_dynamic_batch_om_records_its_gears(tmp_path, onnx_file, fake_atc):
    om = convert_to_om(onnx_file, tmp_path / "models", "Ascend310P3", gears=[1, 2, 4, 8])
    assert om.name.endswith("-Ascend310P3-g1_2_4_8.om")
    assert json.loads(om.with_suffix(".json").read_text())["gears"] == [1, 2, 4, 8]
    (argv,) = fake_atc()
    assert "--input_shape=image:-1,3,256,192" in argv and "--dynamic_batch_size=1,2,4,8" in argv


def test_dynamic_batch_om_is_cached_by_its_gears(tmp_path, onnx_file, fake_atc):
    """A sweep's dynamic OM: ATC runs once for its gears; other gears are another OM."""
    models = tmp_path / "models"
    first = convert_to_om(onnx_file, models, "Ascend310P3", gears=[1, 4, 8])
    assert convert_to_om(onnx_file, models, "Ascend310P3", gears=[1, 4, 8]) == first
    assert len(fake_atc()) == 1
    other = convert_to_om(onnx_file, models, "Ascend310P3", gears=[1, 4, 16])
    assert other != first and len(fake_atc()) == 2


@pytest.mark.parametrize("gears, code", [("8", "E10035"), (",".join(map(str, range(1, 102))), "E10035"),
                                         ("0,4", "E10036"), ("1,x", "E10036")])
def test_fake_atc_refuses_gears_as_atc_does(tmp_path, onnx_file, fake_atc, gears, code):
    """2 to 100 positive gears (spec §3.4): the fake refuses the rest, as ATC does, exit 255."""
    import subprocess

    proc = subprocess.run(["atc", "--framework=5", f"--model={onnx_file}", f"--output={tmp_path / 'm'}",
                           "--input_shape=image:-1,3,256,192", f"--dynamic_batch_size={gears}",
                           "--soc_version=Ascend310P3"], capture_output=True, text=True)
    assert proc.returncode == 255 and f"\n{code}: " in proc.stdout and not list(tmp_path.glob("m*.om"))


def test_failure_shows_exit_status_and_error_codes(tmp_path, onnx_file, fake_atc, monkeypatch):
    monkeypatch.setenv("FAKE_ATC_MODE", "fail")
    models = tmp_path / "models"
    with pytest.raises(AtcError) as e:
        convert_to_om(onnx_file, models, "Ascend310P3", batch_size=16)
    text = one_line(e)
    assert "exit status 255" in text
    assert "E19010: [PID:" in text and "No parser is registered for Op [Resize_120" in text
    assert "EZ3003:" in text and "TraceBack" not in text
    assert str(models) in text  # where the full output is
    assert not list(models.glob("*.om")) and not list(models.glob("*.json"))
    assert "ATC run failed" in next(models.glob("*.atc.log")).read_text()
    # A failure is not cached: the next call runs ATC again.
    with pytest.raises(AtcError):
        convert_to_om(onnx_file, models, "Ascend310P3", batch_size=16)
    assert len(fake_atc()) == 2


def test_exit_0_without_om_is_a_failure(tmp_path, onnx_file, fake_atc, monkeypatch):
    monkeypatch.setenv("FAKE_ATC_MODE", "no_om")
    with pytest.raises(AtcError) as e:
        convert_to_om(onnx_file, tmp_path / "models", "Ascend310P3", batch_size=16)
    text = one_line(e)
    assert "exit status 0" in text and "made 0 files" in text
    assert not list((tmp_path / "models").glob("*.om"))


def test_missing_shared_library_says_source_set_env(tmp_path, onnx_file, fake_atc, monkeypatch):
    monkeypatch.setenv("FAKE_ATC_MODE", "loader")
    with pytest.raises(AtcError) as e:
        convert_to_om(onnx_file, tmp_path / "models", "Ascend310P3", batch_size=16)
    text = one_line(e)
    assert "exit status 127" in text and "libascend_hal.so" in text and f"source {SET_ENV}" in text


def test_atc_absent_is_one_line_naming_set_env(tmp_path, onnx_file, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(AtcError) as e:
        convert_to_om(onnx_file, tmp_path / "models", "Ascend310P3", batch_size=16)
    assert one_line(e) == (f"atc not found on PATH: source {SET_ENV} (CANN's set_env.sh), "
                           "or install the CANN toolkit that provides it")


def test_missing_onnx_is_one_line(tmp_path, fake_atc):
    with pytest.raises(AtcError, match=r"ONNX model .*nope.onnx not found"):
        convert_to_om(tmp_path / "nope.onnx", tmp_path / "models", "Ascend310P3", batch_size=1)
    assert fake_atc() == []


@pytest.mark.parametrize("mode", ["success", "suffix"])
def test_cache_key_is_onnx_hash_soc_and_batch(tmp_path, onnx_file, fake_atc, monkeypatch, mode):
    monkeypatch.setenv("FAKE_ATC_MODE", mode)
    models = tmp_path / "models"
    first = convert_to_om(onnx_file, models, "Ascend310P3", batch_size=16)
    assert convert_to_om(onnx_file, models, "Ascend310P3", batch_size=16) == first
    assert len(fake_atc()) == 1  # the second call did not run atc
    # Another batch, soc, gear set or ONNX content each makes a new OM.
    others = {convert_to_om(onnx_file, models, "Ascend310P3", batch_size=1),  # 'b1' is not a prefix match of 'b16'
              convert_to_om(onnx_file, models, "Ascend310B1", batch_size=16),
              convert_to_om(onnx_file, models, "Ascend310P3", gears=[1, 16])}
    assert convert_to_om(onnx_file, models, "Ascend310P3", batch_size=1) in others
    assert len(fake_atc()) == 4
    onnx_file.write_bytes(b"a re-exported model")
    others.add(convert_to_om(onnx_file, models, "Ascend310P3", batch_size=16))
    assert first not in others and len(others) == 4
    assert len(fake_atc()) == 5


def test_om_without_sidecar_is_not_trusted(tmp_path, onnx_file, fake_atc):
    """An OM left by a killed run (no sidecar) is made again, not used."""
    models = tmp_path / "models"
    om = convert_to_om(onnx_file, models, "Ascend310P3", batch_size=16)
    om.with_suffix(".json").unlink()
    assert convert_to_om(onnx_file, models, "Ascend310P3", batch_size=16) == om
    assert len(fake_atc()) == 2


# --- precision modes and the toolkit's version in the cache key (docs/ascend.md#precision-modes, #atc)

@pytest.mark.parametrize("mode, flag", [("force_fp16", None), ("must_keep_origin_dtype", "--precision_mode="),
                                        ("allow_mix_precision", "--precision_mode="),
                                        ("mixed_float16", "--precision_mode_v2=")])
def test_precision_mode_reaches_atc_under_its_own_flag(mode, flag):
    argv = atc_command("m.onnx", "m", "Ascend310P3", 16, precision_mode=mode)
    modes = [a for a in argv if a.startswith("--precision_mode")]
    # ATC's default is left to ATC: the published recipe's argv is unchanged.
    assert modes == ([] if flag is None else [f"{flag}{mode}"])
    assert argv[-2:] == ["--soc_version=Ascend310P3", "--log=error"]


def test_unknown_precision_mode_is_refused_with_the_names():
    with pytest.raises(ValueError, match=r"precision mode 'fp32'.*must_keep_origin_dtype.*mixed_float16"):
        atc_command("m.onnx", "m", "Ascend310P3", 16, precision_mode="fp32")


def test_each_precision_mode_is_its_own_cached_om(tmp_path, onnx_file, fake_atc):
    models = tmp_path / "models"
    default = convert_to_om(onnx_file, models, "Ascend310P3", batch_size=16)
    kept = convert_to_om(onnx_file, models, "Ascend310P3", batch_size=16, precision_mode="must_keep_origin_dtype")
    assert default.name.endswith("-Ascend310P3-b16.om")
    assert kept.name.endswith("-Ascend310P3-b16-must_keep_origin_dtype.om") and default.is_file()
    assert convert_to_om(onnx_file, models, "Ascend310P3", batch_size=16, precision_mode="must_keep_origin_dtype") \
        == kept and convert_to_om(onnx_file, models, "Ascend310P3", batch_size=16) == default
    first, second = fake_atc()
    assert not any(a.startswith("--precision_mode") for a in first)
    assert "--precision_mode=must_keep_origin_dtype" in second
    assert json.loads(kept.with_suffix(".json").read_text())["precision_mode"] == "must_keep_origin_dtype"


def test_another_toolkit_version_converts_again(tmp_path, onnx_file, fake_atc, monkeypatch):
    """CANN's compiler/version.info beside atc (<toolkit>/compiler/bin/atc): an upgrade is a new conversion."""
    import shutil

    from tasks.atc import atc_version

    toolkit = tmp_path / "toolkit" / "compiler"
    (toolkit / "bin").mkdir(parents=True)
    shutil.copy(FAKE_BIN / "atc", toolkit / "bin" / "atc")
    monkeypatch.setenv("PATH", f"{toolkit / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("ASCEND_TOOLKIT_HOME", raising=False)
    models = tmp_path / "models"
    (toolkit / "version.info").write_text("Version=8.0.RC1\nversion_dir=8.0.RC1\n")
    assert atc_version(toolkit / "bin" / "atc") == "8.0.RC1"
    om = convert_to_om(onnx_file, models, "Ascend310P3", batch_size=16)
    assert convert_to_om(onnx_file, models, "Ascend310P3", batch_size=16) == om and len(fake_atc()) == 1
    assert json.loads(om.with_suffix(".json").read_text())["atc_version"] == "8.0.RC1"
    (toolkit / "version.info").write_text("Version=8.1.RC1\n")
    assert convert_to_om(onnx_file, models, "Ascend310P3", batch_size=16) == om and len(fake_atc()) == 2
    assert json.loads(om.with_suffix(".json").read_text())["atc_version"] == "8.1.RC1"


def test_an_om_made_by_another_argv_converts_again(tmp_path, onnx_file, fake_atc):
    """The sidecar's argv (folders aside) is part of the key: an OM whose recorded ATC flags differ is rebuilt."""
    models = tmp_path / "models"
    om = convert_to_om(onnx_file, models, "Ascend310P3", batch_size=16)
    sidecar = om.with_suffix(".json")
    info = json.loads(sidecar.read_text())
    assert "--log=error" in info["atc_key"] and f"--output={om.stem}" in info["atc_key"]
    info["atc_key"] = [a for a in info["atc_key"] if a != "--log=error"]  # as an older runner ran it
    sidecar.write_text(json.dumps(info))
    assert convert_to_om(onnx_file, models, "Ascend310P3", batch_size=16) == om and len(fake_atc()) == 2
