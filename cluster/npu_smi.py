"""Parse `npu-smi` text into chips, card lists and soc_version; no subprocess here.

Vocabulary (docs/ascend.md#device-ids): a *card id* is npu-smi's `NPU` column, a handle for
`npu-smi -i` and never a device id; a *chip id* is the index of a chip on its card;
an *acl id* is the logical id that `aclrtSetDevice` / `InferSession(device_id=...)`
takes in a process without ASCEND_RT_VISIBLE_DEVICES.

    parse_info(text)        `npu-smi info`            -> list[NpuChip]
    parse_chip_map(text)    `npu-smi info -m`         -> list[ChipLogic]
    parse_card_list(text)   `npu-smi info -l`         -> list[Card]
    parse_board(text)       `npu-smi info -t board`   -> Board
    soc_version(chips, board_text)                    -> 'Ascend310P3', 'Ascend910_9392'
    check_output(text, returncode)  raises NpuSmiUnavailable on the known failures
"""

from collections.abc import Sequence
from dataclasses import dataclass

from tasks.cann import SET_ENV
from tasks.errors import UserError


class NpuSmiUnavailable(UserError, RuntimeError):
    """npu-smi is missing or failed; the message is one line that says what to do."""


@dataclass(frozen=True)
class NpuChip:
    acl_id: int
    card_id: int
    chip_id: int
    name: str  # as npu-smi prints it: '310P3', '910B4', 'Ascend910' (A3)
    health: str
    bus_id: str  # 'NA' on Atlas 200 parts; shared by both chips of a 300I Duo


@dataclass(frozen=True)
class ChipLogic:
    card_id: int
    chip_id: int
    logic_id: int
    name: str  # 'Ascend 910B4', with a space


@dataclass(frozen=True)
class Card:
    card_id: int
    chip_count: int | None  # AI chips only (no MCU); absent on some products


@dataclass(frozen=True)
class Board:
    chip_type: str | None  # 'Ascend' on A2-era parts
    chip_name: str | None  # '910B4', or 'Ascend910' on A3
    npu_name: str | None  # '9392', A3 only


# (text to look for, what to tell the user). Exit codes of these failures are not
# documented (fixtures README), so the text decides, not the status.
KNOWN_ERRORS = (
    ("dcmi module initialize failed",
     "the NPU is probably held by another container, or the driver is not mounted into this one"),
    ("dcmi model initialized failed",
     "the NPU is in use by another process or container, or this container lacks the driver mounts"),
    ("error while loading shared libraries",
     f"driver libraries are not on the loader path: source {SET_ENV} "
     "or add /usr/local/Ascend/driver/lib64 to LD_LIBRARY_PATH"),
    ("No such file or directory",
     "npu-smi is not installed or not mounted: install the Ascend driver, or mount "
     "/usr/local/bin/npu-smi and /usr/local/Ascend/driver into the container"),
    ("command not found",
     "npu-smi is not installed or not mounted: install the Ascend driver, or mount "
     "/usr/local/bin/npu-smi and /usr/local/Ascend/driver into the container"),
)
HEALTH_WORDS = frozenset({"OK", "WARNING", "ALARM", "CRITICAL", "UNKNOWN"})
CPU_HINT = "use --devices cpu or cuda to run without an NPU"


def check_output(text: str, returncode: int = 0) -> None:
    """Raise NpuSmiUnavailable if `text` (stdout + stderr) or `returncode` shows a failure."""
    for needle, advice in KNOWN_ERRORS:
        line = _line_containing(text, needle)
        if line is not None:
            raise NpuSmiUnavailable(f"npu-smi unavailable: {line!r}: {advice}; {CPU_HINT}")
    if returncode != 0:
        raise NpuSmiUnavailable(
            f"npu-smi unavailable: exit status {returncode}: {_first_line(text)!r}; "
            f"check the Ascend driver install (source CANN set_env.sh); {CPU_HINT}")


def parse_info(text: str) -> list[NpuChip]:
    """Chips of `npu-smi info`, in the order printed; stops at the process table.

    Raises NpuSmiUnavailable when the text is an error or has no `NPU ... Name` header.
    """
    check_output(text)
    lines = text.splitlines()
    header = next((i for i, line in enumerate(lines) if _is_header(line)), None)
    if header is None:
        raise NpuSmiUnavailable(
            f"npu-smi unavailable: `npu-smi info` printed no device table (no header with NPU "
            f"and Name); first line: {_first_line(text)!r}; {CPU_HINT}")
    # Header line 2 names the chip row: 'Chip Device' (310/310P/310B) carries the
    # logical id; 'Chip' (910B) and 'Chip Phy-ID' (A3) do not, so there the logical
    # id is the ordinal position, which is also the rule that holds in containers.
    has_device_column = _cells(lines[header + 1])[0].split()[1:2] == ["Device"]

    chips: list[NpuChip] = []
    name_row: list[str] | None = None
    for line in lines[header + 2:]:
        if "Process id" in line:
            break  # process rows look like chip rows ('| 5  0  | 904545 | ...')
        cells = _cells(line)
        if len(cells) < 2:
            continue  # borders
        if cells[1].upper() in HEALTH_WORDS:
            # Tell the name row by its health cell, not by a numeric name: legacy 310 is named '310'.
            if name_row is not None:
                raise _unparseable(line, "two name rows without a chip row between them")
            name_row = cells
        elif name_row is not None:
            chips.append(_chip(name_row, cells, len(chips), has_device_column, line))
            name_row = None
    if name_row is not None:
        raise _unparseable(" | ".join(name_row), "name row without a chip row")
    ids = [c.acl_id for c in chips]
    if len(set(ids)) != len(ids):
        raise _unparseable(f"Device column {ids}", "repeated device ids")
    return chips


def parse_chip_map(text: str) -> list[ChipLogic]:
    """AI chips of `npu-smi info -m`; columns found by header, MCU and NPU ID -1 rows skipped."""
    check_output(text)
    lines = text.splitlines()
    header = next((i for i, line in enumerate(lines) if "Chip Logic ID" in line and "NPU ID" in line), None)
    if header is None:
        raise NpuSmiUnavailable(
            f"npu-smi unavailable: `npu-smi info -m` printed no 'NPU ID ... Chip Logic ID' header; "
            f"first line: {_first_line(text)!r}")
    # Columns are separated by runs of spaces; 'Ascend 910B4' has a single one.
    names = _columns(lines[header])
    card, chip, logic, name = (names.index(n) for n in ("NPU ID", "Chip ID", "Chip Logic ID", "Chip Name"))
    chips = []
    for line in lines[header + 1:]:
        values = _columns(line)
        if len(values) < len(names):
            continue
        if values[logic] == "-" or values[card] == "-1":
            continue  # MCU row, or a card the driver marks unusable
        if not all(values[i].isdigit() for i in (card, chip, logic)):
            raise _unparseable(line, "expected numeric NPU ID, Chip ID and Chip Logic ID")
        chips.append(ChipLogic(int(values[card]), int(values[chip]), int(values[logic]), values[name]))
    return chips


def parse_card_list(text: str) -> list[Card]:
    """Cards of `npu-smi info -l`: one per `NPU ID : x` line."""
    check_output(text)
    cards: list[Card] = []
    for key, value in _key_values(text):
        if key == "NPU ID":
            cards.append(Card(int(value), None))
        elif key == "Chip Count" and cards:
            cards[-1] = Card(cards[-1].card_id, int(value))
    return cards


def parse_board(text: str) -> Board:
    """The soc-related keys of `npu-smi info -t board -i <card> -c <chip>`."""
    check_output(text)
    fields = dict(_key_values(text))
    return Board(fields.get("Chip Type"), fields.get("Chip Name"), fields.get("NPU Name"))


def soc_version(chips: Sequence[NpuChip], board_text: str | None = None) -> str:
    """ATC --soc_version for chips that share one Name (docs/ascend.md#soc-version).

    'Ascend' + Name ('310P3' -> 'Ascend310P3'), except on A3 where Name is already
    'Ascend910' and the soc ('Ascend910_9392') is only in `npu-smi info -t board`.
    Raises ValueError when the chips are absent or mixed, or A3 has no board text.
    """
    names = sorted({c.name for c in chips})
    if len(names) != 1:
        raise ValueError(f"soc_version needs chips of one kind, got {names or 'none'}; pass --soc-version")
    name = names[0]
    if board_text is not None:
        return board_soc(parse_board(board_text))
    if name.startswith("Ascend"):
        # Prefixing again gives 'AscendAscend910' (LMCache-Ascend issue #32).
        raise ValueError(
            f"soc_version for {name} needs `npu-smi info -t board -i <card> -c 0` (A3); pass --soc-version")
    return "Ascend" + name


def board_soc(board: Board) -> str:
    """'Chip Name_NPU Name' on A3 ('Ascend910_9392'), else 'Chip Type' + 'Chip Name'."""
    if board.chip_name and board.npu_name:
        return f"{board.chip_name}_{board.npu_name}"
    if board.chip_type and board.chip_name:
        return board.chip_type + board.chip_name
    raise ValueError(f"npu-smi board text lacks Chip Type/Chip Name/NPU Name: {board}; pass --soc-version")


def _chip(name_row: list[str], chip_row: list[str], ordinal: int, has_device_column: bool,
          line: str) -> NpuChip:
    card = name_row[0].split(maxsplit=1)
    chip = chip_row[0].split()
    if len(card) != 2 or not card[0].isdigit() or not chip or not all(t.isdigit() for t in chip):
        raise _unparseable(line, "expected '<card id> <name>' then '<chip id> [<device>]'")
    if has_device_column and len(chip) != 2:
        raise _unparseable(line, "chip row lacks the Device column")
    acl_id = int(chip[1]) if has_device_column else ordinal
    return NpuChip(acl_id, int(card[0]), int(chip[0]), card[1], name_row[1], chip_row[1])


def _is_header(line: str) -> bool:
    cells = _cells(line)
    return bool(cells) and cells[0].split()[:2] == ["NPU", "Name"]


def _cells(line: str) -> list[str]:
    """'| a b | c |' -> ['a b', 'c']; border lines ('+---+', '|---|') give []."""
    line = line.strip()
    if not line.startswith("|") or set(line) <= set("+-=| "):
        return []
    return [cell.strip() for cell in line.strip("|").split("|")]


def _columns(line: str) -> list[str]:
    return [v for v in (part.strip() for part in line.strip().split("  ")) if v]


def _key_values(text: str) -> list[tuple[str, str]]:
    pairs = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            pairs.append((key.strip(), value.strip()))
    return pairs


def _line_containing(text: str, needle: str) -> str | None:
    return next((line.strip() for line in text.splitlines() if needle in line), None)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "(no output)")


def _unparseable(line: str, why: str) -> NpuSmiUnavailable:
    return NpuSmiUnavailable(f"npu-smi info: cannot read {line.strip()!r}: {why}; {CPU_HINT} "
                             f"and report this output")
