"""npu-smi parsers over every capture in ../shared/fixtures/npu-smi and over hand-written text.

The expected ids are copied from the fixtures README; a new fixture file fails
`test_every_fixture_has_expectations` until its row is added here.
"""

from pathlib import Path

import pytest

from cluster.npu_smi import (Board, Card, ChipLogic, NpuSmiUnavailable, board_soc, check_output, parse_board,
                             parse_card_list, parse_chip_map, parse_info, soc_version)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures" / "npu-smi"
needs_shared = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"../shared is absent (a user clone has none): {FIXTURES} not found")


def fixtures(prefix: str) -> list[str]:
    return sorted(p.name for p in FIXTURES.glob(f"{prefix}*.txt")) if FIXTURES.is_dir() else []


def read(name: str) -> str:
    return (FIXTURES / name).read_text()


# file -> (npu_ids, acl_ids, soc); soc None where `npu-smi info` alone cannot tell (A3).
INFO = {
    "info_310_atlas300_5cards_20.2.2.txt": ([2048, 2049, 2050, 2051, 2052], list(range(20)), "Ascend310"),
    "info_310_atlas200dk_21.0.3.1.txt": ([0], [0], "Ascend310"),
    "info_310p3_duo_1card_25.2.0.txt": ([2], [0, 1], "Ascend310P3"),
    "info_310p3_duo_4cards_procs_25.2.0.txt": ([2, 3, 5, 6], list(range(8)), "Ascend310P3"),
    "info_310p3_duo_2cards_container_25.2.0.txt": ([64, 32832], list(range(4)), "Ascend310P3"),
    "info_310p3_duo_4cards_blank_procname_25.3.rc1.txt": ([0, 96, 32768, 32896], list(range(8)), "Ascend310P3"),
    "info_310p3_duo_npu1792_container_24.1.rc2.txt": ([1792], [0, 1], "Ascend310P3"),
    "info_310p3_pro_2cards_modelzoo_doc.txt": ([0, 1], [0, 1], "Ascend310P3"),
    "info_310b1_atlas200ia2_doc_23.0.rc3.txt": ([0], [0], "Ascend310B1"),
    "info_910b2_8npu_23.0.7.txt": (list(range(8)), list(range(8)), "Ascend910B2"),
    "info_910b4_container_npu6_7_25.5.1.txt": ([6, 7], [0, 1], "Ascend910B4"),
    "info_910_a3_16dev_phyid_25.2.1.txt": (list(range(8)), list(range(16)), None),
}
CHIP_MAP = {  # file -> [(card id, logic id)]
    "m_910b4_8npu.txt": [(i, i) for i in range(8)],
    "m_doc_atlas200ia2_template.txt": [(0, 0)],
    "m_msit_doc_npu4_logic0.txt": [(4, 0)],
}
CARD_LIST = {  # file -> [(card id, chip count)]
    "l_910b4_8npu.txt": [(i, 1) for i in range(8)],
    "l_container_npu6_total1.txt": [(6, 1)],
    "l_doc_a3_chipcount2.txt": [(0, 2)],
    "l_doc_atlas200ia2_cardcount.txt": [(0, 1)],
}
BOARD = {
    "board_a2_910b4_i0_c0.txt": "Ascend910B4",
    "board_a3_ascend910_9392_i0_c0.txt": "Ascend910_9392",
}
ERRORS = {  # file -> text the one-line message must quote
    "err_dcmi_device_used_8020.txt": "ret is -8020",
    "err_dcmi_init_8005_container.txt": "ret is -8005",
    "err_missing_libc_sec.txt": "libc_sec.so",
    "err_npu_smi_not_mounted.txt": "/usr/local/bin/npu-smi: No such file or directory",
}


@needs_shared
def test_every_fixture_has_expectations():
    known = {*INFO, *CHIP_MAP, *CARD_LIST, *BOARD, *ERRORS}
    assert sorted(p.name for p in FIXTURES.glob("*.txt")) == sorted(known)


@needs_shared
@pytest.mark.parametrize("name", fixtures("info_"))
def test_info_ids_and_soc(name):
    npu_ids, acl_ids, soc = INFO[name]
    chips = parse_info(read(name))
    assert list(dict.fromkeys(c.card_id for c in chips)) == npu_ids
    assert [c.acl_id for c in chips] == acl_ids
    if soc is None:
        with pytest.raises(ValueError, match="board"):
            soc_version(chips)
    else:
        assert soc_version(chips) == soc


@needs_shared
@pytest.mark.parametrize("name", fixtures("info_"))
def test_info_card_ids_are_never_acl_ids(name):
    chips = parse_info(read(name))
    # Logical ids are 0..n-1 in every capture, whatever the card ids (64, 1792, 32768 ...).
    assert sorted(c.acl_id for c in chips) == list(range(len(chips)))
    assert all(c.health == "OK" and c.bus_id for c in chips)
    if any(c.card_id != c.acl_id for c in chips):
        assert [c.acl_id for c in chips] != [c.card_id for c in chips]


@needs_shared
@pytest.mark.parametrize("name", fixtures("info_"))
def test_info_process_table_yields_no_devices(name):
    text = read(name)
    before = text.split("Process id")[0].rsplit("\n", 1)[0]
    # Rows shaped like chip rows, with and without a process name, after the device table.
    extra = ("\n| NPU     Chip   | Process id  | Process name | Process memory(MB) |\n"
             "| 5       0      | 904545      | python3      | 101                |\n"
             "| 0       1      | 326430      |              | 34086              |\n"
             "| 3       OK     | 1           | x            | 1                  |\n")
    assert parse_info(text) == parse_info(before) == parse_info(before + extra)


def test_a3_soc_needs_board_and_never_doubles_prefix():
    chips = parse_info(HAND_WRITTEN_A3)
    with pytest.raises(ValueError, match="needs `npu-smi info -t board"):
        soc_version(chips)
    assert soc_version(chips, HAND_WRITTEN_A3_BOARD) == "Ascend910_9392"


@needs_shared
def test_a3_fixture_soc_from_board_fixture():
    chips = parse_info(read("info_910_a3_16dev_phyid_25.2.1.txt"))
    assert {c.name for c in chips} == {"Ascend910"}
    soc = soc_version(chips, read("board_a3_ascend910_9392_i0_c0.txt"))
    assert soc == "Ascend910_9392" and "AscendAscend" not in soc


@needs_shared
@pytest.mark.parametrize("name", fixtures("m_"))
def test_chip_map_logic_ids(name):
    assert [(c.card_id, c.logic_id) for c in parse_chip_map(read(name))] == CHIP_MAP[name]


@needs_shared
@pytest.mark.parametrize("name", fixtures("l_"))
def test_card_list(name):
    assert [(c.card_id, c.chip_count) for c in parse_card_list(read(name))] == CARD_LIST[name]


@needs_shared
@pytest.mark.parametrize("name", fixtures("board_"))
def test_board_soc(name):
    assert board_soc(parse_board(read(name))) == BOARD[name]


@needs_shared
@pytest.mark.parametrize("name", fixtures("err_"))
def test_error_fixtures_are_unavailable_with_one_line(name):
    text = read(name)
    for call in (lambda: check_output(text, 1), lambda: check_output(text, 0), lambda: parse_info(text)):
        with pytest.raises(NpuSmiUnavailable) as e:
            call()
        message = str(e.value)
        assert "\n" not in message and ERRORS[name] in message
        assert "npu-smi unavailable" in message


# --- Hand-written text, NOT real captures: shaped like spec §2.2-2.4 so the parsers are
# --- covered in a user's clone, where ../shared is absent.

HAND_WRITTEN_310P_DUO = """\
+-------------------------------+-----------------+------------------------------------------------------+
| NPU     Name                  | Health          | Power(W)     Temp(C)           Hugepages-Usage(page) |
| Chip    Device                | Bus-Id          | AICore(%)    Memory-Usage(MB)                        |
+===============================+=================+======================================================+
| 32768   310P3                 | Warning         | NA           50                0     / 0             |
| 0       0                     | 0000:81:00.0    | 0            100/ 44280                              |
+-------------------------------+-----------------+------------------------------------------------------+
| 32768   310P3                 | OK              | NA           50                0     / 0             |
| 1       1                     | 0000:81:00.0    | 0            100 / 43693                             |
+===============================+=================+======================================================+
| 7       310P3                 | OK              | NA           50                0     / 0             |
| 0       2                     | 0000:82:00.0    | 0            100 / 44280                             |
+-------------------------------+-----------------+------------------------------------------------------+
| 7       310P3                 | OK              | NA           50                0     / 0             |
| 1       3                     | 0000:82:00.0    | 0            100 / 43693                             |
+===============================+=================+======================================================+
+-------------------------------+-----------------+------------------------------------------------------+
| NPU     Chip                  | Process id      | Process name             | Process memory(MB)        |
+===============================+=================+======================================================+
| 7       0                     | 1234            | python3                  | 101                       |
| 7       1                     | 1235            |                          | 100                       |
+===============================+=================+======================================================+
"""

HAND_WRITTEN_A3 = """\
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip  Phy-ID              | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 4     Ascend910           | OK            | 160.0       36                0    / 0             |
| 0     8                   | 0000:9D:00.0  | 0           0    / 0          3122 / 65536         |
+------------------------------------------------------------------------------------------------+
| 4     Ascend910           | OK            | -           36                0    / 0             |
| 1     9                   | 0000:9F:00.0  | 0           0    / 0          2891 / 65536         |
+===========================+===============+====================================================+
"""

HAND_WRITTEN_A3_BOARD = """\
        NPU ID                         : 4
        NPU Name                       : 9392
        Chip ID                        : 0
        Chip Name                      : Ascend910
"""

HAND_WRITTEN_CHIP_MAP = """\
    NPU ID     Chip ID    Chip Logic ID    Chip Phy-ID    Chip Name
    32768      0          0                0              Ascend 310P3
    32768      1          1                1              Ascend 310P3
    32768      2          -                -              Mcu
    -1         0          5                5              Ascend 310P3
"""

HAND_WRITTEN_CARD_LIST = """\
Card Count : 2
NPU ID : 32768
Product Name : NA
Chip Count : 2
NPU ID : 7
"""


def test_hand_written_310p_duo():
    chips = parse_info(HAND_WRITTEN_310P_DUO)
    assert [(c.acl_id, c.card_id, c.chip_id) for c in chips] == [(0, 32768, 0), (1, 32768, 1), (2, 7, 0), (3, 7, 1)]
    assert chips[0].health == "Warning" and chips[0].bus_id == chips[1].bus_id == "0000:81:00.0"
    assert soc_version(chips) == "Ascend310P3"


def test_hand_written_a3_uses_ordinal_not_phy_id():
    chips = parse_info(HAND_WRITTEN_A3)
    assert [(c.acl_id, c.card_id, c.chip_id, c.name) for c in chips] == [(0, 4, 0, "Ascend910"), (1, 4, 1, "Ascend910")]


def test_hand_written_chip_map_finds_columns_by_header():
    assert parse_chip_map(HAND_WRITTEN_CHIP_MAP) == [ChipLogic(32768, 0, 0, "Ascend 310P3"),
                                                     ChipLogic(32768, 1, 1, "Ascend 310P3")]


def test_hand_written_card_list():
    assert parse_card_list(HAND_WRITTEN_CARD_LIST) == [Card(32768, 2), Card(7, None)]


def test_board_a2_style():
    assert board_soc(Board("Ascend", "910B4", None)) == "Ascend910B4"
    assert soc_version(parse_info(HAND_WRITTEN_310P_DUO), "Chip Type : Ascend\nChip Name : 310P3\n") == "Ascend310P3"
    with pytest.raises(ValueError, match="soc-version"):
        board_soc(Board(None, None, None))


def test_mixed_chip_names_have_no_single_soc():
    chips = parse_info(HAND_WRITTEN_310P_DUO) + parse_info(HAND_WRITTEN_A3)
    with pytest.raises(ValueError, match="one kind"):
        soc_version(chips)


@pytest.mark.parametrize("text, quoted", [
    ("DrvMngGetConsoleLogLevel failed. (ret=4)\ndcmi module initialize failed. ret is -8005\n", "-8005"),
    ("npu-smi: error while loading shared libraries: libdrvdsmi_host.so: cannot open shared object file", "libdrvdsmi"),
    ("sh: 1: npu-smi: command not found\n", "command not found"),
    ("Segmentation fault\n", "exit status 139"),
])
def test_hand_written_errors_are_one_line(text, quoted):
    with pytest.raises(NpuSmiUnavailable) as e:
        check_output(text, 139)
    assert quoted in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["", "Usage: npu-smi info <watch|proc|...>\n", HAND_WRITTEN_CARD_LIST])
def test_no_table_header_is_unavailable(text):
    with pytest.raises(NpuSmiUnavailable, match="no header with NPU and Name") as e:
        parse_info(text)
    assert "\n" not in str(e.value)


def test_header_without_rows_is_zero_chips():
    assert parse_info(HAND_WRITTEN_310P_DUO.split("| 32768")[0]) == []


@pytest.mark.parametrize("broken, why", [
    ("| 7       310P3   | OK   | NA  50 |\n| 0                 | 0000:82:00.0 | 0 |\n", "lacks the Device column"),
    ("| 7       310P3   | OK   | NA  50 |\n| 7       310P3   | OK   | NA  50 |\n| 0  1 | NA | 0 |\n", "two name rows"),
    ("| 7       310P3   | OK   | NA  50 |\n", "without a chip row"),
    ("| 7   310P3 | OK | NA |\n| 0  0 | NA | 0 |\n| 8   310P3 | OK | NA |\n| 0  0 | NA | 0 |\n", "repeated"),
])
def test_malformed_rows_are_refused_not_guessed(broken, why):
    header = HAND_WRITTEN_310P_DUO.split("| 32768")[0]
    with pytest.raises(NpuSmiUnavailable, match=why):
        parse_info(header + broken)
