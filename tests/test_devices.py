"""Device discovery through a fake `npu-smi` on PATH, and `--devices` parsing without hardware."""

import os
import sys
import types
from pathlib import Path

import pytest

from cluster.devices import (Device, DeviceError, chip_map_disagreements, discover_cuda, discover_npus,
                             parse_devices, run_npu_smi, visible_npu_ids)
from cluster.npu_smi import NpuSmiUnavailable

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures" / "npu-smi"
needs_shared = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"../shared is absent (a user clone has none): {FIXTURES} not found")

# Hand-written, NOT a real capture: a 300I Duo card (two 310P3 chips sharing card id 32768).
HAND_WRITTEN_DUO = """\
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
| 40      310P3                 | OK              | NA           50                0     / 0             |
| 0       2                     | 0000:82:00.0    | 0            100 / 44280                             |
+===============================+=================+======================================================+
"""
# Hand-written, NOT a real capture: one A3 board (Name already 'Ascend910') and its board text.
HAND_WRITTEN_A3 = """\
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip  Phy-ID              | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 3     Ascend910           | OK            | 160.0       36                0    / 0             |
| 0     6                   | 0000:9D:00.0  | 0           0    / 0          3122 / 65536         |
+------------------------------------------------------------------------------------------------+
| 3     Ascend910           | OK            | -           36                0    / 0             |
| 1     7                   | 0000:9F:00.0  | 0           0    / 0          2891 / 65536         |
"""
HAND_WRITTEN_A3_BOARD = "NPU ID : 3\nNPU Name : 9392\nChip ID : 0\nChip Name : Ascend910\n"
HAND_WRITTEN_ERROR = "DrvMngGetConsoleLogLevel failed. (ret=4)\ndcmi module initialize failed. ret is -8005\n"


def fake_npu_smi(tmp_path: Path, monkeypatch, info: str = "", board: str | None = None, stderr: str = "",
                 status: int = 0, sleep: float = 0) -> Path:
    """Put an `npu-smi` first on PATH that prints `info` (or `board` for `-t board`); returns its call log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "info.txt").write_text(info)
    (tmp_path / "stderr.txt").write_text(stderr)
    (tmp_path / "board.txt").write_text(board or "")
    log = tmp_path / "calls.log"
    board_line = (f'cat "{tmp_path}/board.txt"; exit 0' if board is not None
                  else "echo 'board: not supported' >&2; exit 2")
    script = bin_dir / "npu-smi"
    script.write_text(f"""#!/bin/sh
echo "$*" >> "{log}"
sleep {sleep}
if [ "$1 $2 $3" = "info -t board" ]; then {board_line}; fi
cat "{tmp_path}/info.txt"
cat "{tmp_path}/stderr.txt" >&2
exit {status}
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)
    return log


def npu(i: int, name: str = "Ascend310P3", logical: int | None = None) -> Device:
    return Device("npu", i, name, name, i if logical is None else logical)


def never() -> list[Device]:
    raise AssertionError("discovery must not run for this spec")


# --- discovery through a fake npu-smi

def test_discover_duo(tmp_path, monkeypatch):
    log = fake_npu_smi(tmp_path, monkeypatch, HAND_WRITTEN_DUO)
    assert discover_npus() == [Device("npu", 0, "Ascend310P3", "Ascend310P3", 0, 32768, "OK", 0),
                               Device("npu", 1, "Ascend310P3", "Ascend310P3", 1, 32768, "OK", 1),
                               Device("npu", 2, "Ascend310P3", "Ascend310P3", 2, 40, "OK", 0)]
    assert log.read_text() == "info\n"


def test_discover_a3_reads_board_for_soc(tmp_path, monkeypatch):
    log = fake_npu_smi(tmp_path, monkeypatch, HAND_WRITTEN_A3, board=HAND_WRITTEN_A3_BOARD)
    devices = discover_npus()
    assert [(d.id, d.name, d.soc, d.card_id) for d in devices] == [(0, "Ascend910", "Ascend910_9392", 3),
                                                                   (1, "Ascend910", "Ascend910_9392", 3)]
    assert log.read_text() == "info\ninfo -t board -i 3 -c 0\n"


def test_discover_a3_without_board_leaves_soc_unknown(tmp_path, monkeypatch):
    fake_npu_smi(tmp_path, monkeypatch, HAND_WRITTEN_A3)
    assert [(d.id, d.soc) for d in discover_npus()] == [(0, None), (1, None)]


@pytest.mark.parametrize("visible, ids", [("1,2", [(0, 1), (1, 2)]), ("2", [(0, 2)]), ("0,2,1", [(0, 0), (1, 2)]),
                                          ("1, 2", [(0, 1)]), ("0,9,1", [(0, 0)])])
def test_discover_honours_ascend_rt_visible_devices(tmp_path, monkeypatch, visible, ids):
    fake_npu_smi(tmp_path, monkeypatch, HAND_WRITTEN_DUO)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", visible)
    assert [(d.id, d.logical_id) for d in discover_npus()] == ids


def test_visible_devices_hiding_everything_is_one_line(tmp_path, monkeypatch):
    fake_npu_smi(tmp_path, monkeypatch, HAND_WRITTEN_DUO)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "7")
    with pytest.raises(DeviceError, match=r"^--devices 0: ASCEND_RT_VISIBLE_DEVICES='7' leaves no NPU visible"):
        parse_devices("0")


def test_visible_npu_ids_rules():
    assert visible_npu_ids("0,1,2", [0, 1, 2]) == [0, 1, 2]
    assert visible_npu_ids("2,1", [0, 1, 2]) == [2]  # ascending only
    assert visible_npu_ids("0,1x,2", [0, 1, 2]) == [0, 1]  # stops at another character
    assert visible_npu_ids(" 0", [0]) == []
    assert visible_npu_ids("", [0]) == []


def test_present_ids_show_logical_ids_when_renumbered(tmp_path, monkeypatch):
    fake_npu_smi(tmp_path, monkeypatch, HAND_WRITTEN_DUO)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "1,2")
    with pytest.raises(DeviceError) as e:
        parse_devices("2")
    assert str(e.value) == ("--devices 2: NPU 2 not found; present: 0, 1 "
                            "(Ascend310P3; logical 1, 2 via ASCEND_RT_VISIBLE_DEVICES)")


@pytest.mark.parametrize("stderr, status, quoted", [
    (HAND_WRITTEN_ERROR, 1, "ret is -8005"),
    ("", 3, "exit status 3"),
])
def test_failing_npu_smi_is_one_line(tmp_path, monkeypatch, stderr, status, quoted):
    log = fake_npu_smi(tmp_path, monkeypatch, stderr=stderr, status=status)
    with pytest.raises(NpuSmiUnavailable) as e:
        discover_npus()
    assert quoted in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DeviceError, match=rf"^--devices all: npu-smi unavailable: .*{quoted}"):
        parse_devices("all")
    assert log.read_text() == "info\ninfo\n"


def test_npu_smi_without_table_is_unavailable(tmp_path, monkeypatch):
    fake_npu_smi(tmp_path, monkeypatch, "Usage: npu-smi info <watch|proc|...>\n")
    with pytest.raises(NpuSmiUnavailable, match="no header with NPU and Name"):
        discover_npus()


def test_npu_smi_absent_from_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NpuSmiUnavailable, match="npu-smi not found on PATH") as e:
        discover_npus()
    assert "\n" not in str(e.value)
    with pytest.raises(DeviceError, match="^--devices 0,1: npu-smi unavailable: npu-smi not found on PATH"):
        parse_devices("0,1")


def test_npu_smi_that_hangs_times_out(tmp_path, monkeypatch):
    fake_npu_smi(tmp_path, monkeypatch, HAND_WRITTEN_DUO, sleep=5)
    with pytest.raises(NpuSmiUnavailable, match="did not answer in 0.2 s"):
        run_npu_smi(["info"], timeout=0.2)


def test_cpu_and_cuda_never_call_npu_smi(tmp_path, monkeypatch):
    log = fake_npu_smi(tmp_path, monkeypatch, HAND_WRITTEN_DUO)
    assert parse_devices("cpu:2", cuda=never) == [Device("cpu", 0, "cpu"), Device("cpu", 1, "cpu")]
    assert parse_devices("cuda", cuda=lambda: [Device("cuda", 0, "gpu")]) == [Device("cuda", 0, "gpu")]
    assert not log.exists()


@needs_shared
@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("info_*.txt")) if FIXTURES.is_dir() else [])
def test_fixture_through_fake_npu_smi(tmp_path, monkeypatch, name):
    fake_npu_smi(tmp_path, monkeypatch, (FIXTURES / name).read_text(),
                 board=(FIXTURES / "board_a3_ascend910_9392_i0_c0.txt").read_text())
    devices = parse_devices("all")
    assert [d.id for d in devices] == list(range(len(devices)))
    assert all(d.soc and not d.soc.startswith("AscendAscend") for d in devices)
    assert parse_devices("0") == devices[:1]
    n = len(devices)
    with pytest.raises(DeviceError) as e:
        parse_devices(f"0,{n}")
    present = ", ".join(str(i) for i in range(n))
    assert str(e.value) == f"--devices 0,{n}: NPU {n} not found; present: {present} ({devices[0].name})"


@needs_shared
@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("err_*.txt")) if FIXTURES.is_dir() else [])
def test_err_fixture_on_stderr_is_one_line(tmp_path, monkeypatch, name):
    text = (FIXTURES / name).read_text()
    fake_npu_smi(tmp_path, monkeypatch, stderr=text, status=127 if "not_mounted" in name else 1)
    with pytest.raises(DeviceError) as e:
        parse_devices("0")
    message = str(e.value)
    assert message.startswith("--devices 0: npu-smi unavailable: ") and "\n" not in message
    assert any(line.strip() in message for line in text.splitlines()[-1:])


# --- parse_devices with discovery injected (no hardware, no npu-smi)

TWO_NPUS = [npu(0), npu(1)]


@pytest.mark.parametrize("spec, ids", [("0", [0]), ("0,1", [0, 1]), ("1,0", [0, 1]), (" 1 ", [1]), ("0, 1", [0, 1]),
                                       ("all", [0, 1])])
def test_npu_specs(spec, ids):
    assert parse_devices(spec, npus=lambda: TWO_NPUS, cuda=never) == [TWO_NPUS[i] for i in ids]


@pytest.mark.parametrize("spec, ids", [("cuda", [0, 1, 2]), ("cuda:2", [2]), ("cuda:2,0", [0, 2])])
def test_cuda_specs(spec, ids):
    gpus = [Device("cuda", i, "NVIDIA H100") for i in range(3)]
    assert [d.id for d in parse_devices(spec, npus=never, cuda=lambda: gpus)] == ids


@pytest.mark.parametrize("spec, count", [("cpu", 1), ("cpu:1", 1), ("cpu:4", 4)])
def test_cpu_specs(spec, count):
    assert parse_devices(spec, npus=never, cuda=never) == [Device("cpu", i, "cpu") for i in range(count)]


@pytest.mark.parametrize("spec, message", [
    ("3", "--devices 3: NPU 3 not found; present: 0, 1 (Ascend310P3)"),
    ("0,3,4", "--devices 0,3,4: NPU 3, 4 not found; present: 0, 1 (Ascend310P3)"),
    ("cuda:1", "--devices cuda:1: GPU 1 not found; present: 0 (NVIDIA H100)"),
    ("0,0", "--devices 0,0: 0 given more than once"),
    ("cpu:0", "--devices cpu:0: cpu:N needs N >= 1"),
    ("", "--devices: expected 0,1 | all | cuda | cuda:0,1 | cpu | cpu:N, got ''"),
    ("npu:0", "--devices: expected 0,1 | all | cuda | cuda:0,1 | cpu | cpu:N, got 'npu:0'"),
    ("gpu", "--devices: expected 0,1 | all | cuda | cuda:0,1 | cpu | cpu:N, got 'gpu'"),
    ("-1", "--devices: expected 0,1 | all | cuda | cuda:0,1 | cpu | cpu:N, got '-1'"),
    ("0,,1", "--devices: expected 0,1 | all | cuda | cuda:0,1 | cpu | cpu:N, got '0,,1'"),
    ("cuda:", "--devices: expected 0,1 | all | cuda | cuda:0,1 | cpu | cpu:N, got 'cuda:'"),
    ("cpu:2,3", "--devices: expected 0,1 | all | cuda | cuda:0,1 | cpu | cpu:N, got 'cpu:2,3'"),
])
def test_bad_specs_are_one_line(spec, message):
    with pytest.raises(DeviceError) as e:
        parse_devices(spec, npus=lambda: TWO_NPUS, cuda=lambda: [Device("cuda", 0, "NVIDIA H100")])
    assert str(e.value) == message


def test_present_lists_each_chip_kind():
    mixed = [npu(0), npu(1, "Ascend910B4")]
    with pytest.raises(DeviceError, match=r"present: 0 \(Ascend310P3\), 1 \(Ascend910B4\)$"):
        parse_devices("2", npus=lambda: mixed)


@pytest.mark.parametrize("spec, message", [
    ("all", "--devices all: no NPU found (npu-smi lists no chips)"),
    ("cuda", "--devices cuda: no GPU found (torch is missing or torch.cuda.is_available() is False)"),
])
def test_nothing_found(spec, message):
    with pytest.raises(DeviceError) as e:
        parse_devices(spec, npus=list, cuda=list)
    assert str(e.value) == message


def test_device_error_is_a_value_error():
    assert issubclass(DeviceError, ValueError)


# --- discover_cuda with torch swapped for plain fake modules

def test_discover_cuda_without_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    assert discover_cuda() == []


def test_discover_cuda_with_fake_torch(monkeypatch):
    cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 2,
                                 get_device_name=lambda i: f"Fake GPU {i}")
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert discover_cuda() == [Device("cuda", 0, "Fake GPU 0"), Device("cuda", 1, "Fake GPU 1")]
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    assert discover_cuda() == []


# --- Health and the npu-smi info -m cross-check (docs/ascend.md#chip-health, #device-ids)

def test_all_refuses_a_chip_whose_health_is_not_ok_and_named_ids_take_it(tmp_path, monkeypatch):
    fake_npu_smi(tmp_path, monkeypatch, HAND_WRITTEN_DUO.replace(
        "| 32768   310P3                 | OK      ", "| 32768   310P3                 | Critical", 1))
    with pytest.raises(DeviceError) as e:
        parse_devices("all")
    assert str(e.value) == ("--devices all: npu-smi info reports NPU 0 (Critical) not OK; a run takes such a chip "
                            "only when --devices names it: --devices 1,2 without it, or --devices 0,1,2 to use it "
                            "anyway")
    assert [(d.id, d.health) for d in parse_devices("0,1")] == [(0, "Critical"), (1, "OK")]


def test_chip_map_cross_check_names_each_disagreement():
    from cluster.npu_smi import ChipLogic

    devices = [Device("npu", 0, "Ascend910B4", "Ascend910B4", 0, 6, "OK", 0),
               Device("npu", 1, "Ascend910B4", "Ascend910B4", 1, 7, "OK", 0)]
    assert chip_map_disagreements(devices, [ChipLogic(6, 0, 0, "Ascend 910B4"), ChipLogic(7, 0, 1, "Ascend 910B4")]) \
        == []
    assert chip_map_disagreements(devices, [ChipLogic(6, 0, 6, "Ascend 910B4")]) == [
        "card 6 chip 0: npu-smi info gives logical id 0, -m gives 6",
        "card 7 chip 0 (logical 1) is not in npu-smi info -m"]


@needs_shared
def test_chip_map_of_the_910b4_capture_agrees_with_the_ordinal_rule():
    """The 910B4 capture's -m (NPU ids 0..7, chip 0, logic ids 0..7) against chips read in that order."""
    from cluster.npu_smi import parse_chip_map

    chip_map = parse_chip_map((FIXTURES / "m_910b4_8npu.txt").read_text())
    devices = [Device("npu", i, "Ascend910B4", "Ascend910B4", i, i, "OK", 0) for i in range(8)]
    assert chip_map_disagreements(devices, chip_map) == []
