"""Find the devices of this host and read `--devices`.

    parse_devices('0,1')     -> NPUs with logical ids 0 and 1 (docs/ascend.md#device-ids)
    parse_devices('all')     -> every NPU npu-smi lists
    parse_devices('cuda:0')  -> GPU 0;  'cuda' -> every GPU torch sees
    parse_devices('cpu:4')   -> 4 CPU workers;  'cpu' -> one

Discovery runs only for the kind the spec names, so `--devices cpu` never calls npu-smi.
"""

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from cluster.npu_smi import CPU_HINT, ChipLogic, NpuChip, NpuSmiUnavailable, check_output, parse_info, soc_version
from tasks.errors import UserError

FORMS = "0,1 | all | cuda | cuda:0,1 | cpu | cpu:N"


class DeviceError(UserError, ValueError):
    """A `--devices` value that cannot be honoured; the message is one line for the user."""


@dataclass(frozen=True)
class Device:
    """One device a worker can own.

    `id` is what `--devices` names: the ACL user id for 'npu' (the logical id unless
    ASCEND_RT_VISIBLE_DEVICES renumbers this process's NPUs), the CUDA index, or the
    CPU worker index. `logical_id` is the NPU's id outside that renumbering: the value
    to put in ASCEND_RT_VISIBLE_DEVICES when pinning Ray actors (docs/ascend.md#device-ids).
    """

    kind: str  # 'npu' | 'cuda' | 'cpu'
    id: int
    name: str  # 'Ascend310P3', 'NVIDIA H100 80GB HBM3', 'cpu'
    soc: str | None = None  # ATC --soc_version; None when npu-smi cannot tell (pass --soc-version)
    logical_id: int | None = None
    card_id: int | None = None  # npu-smi -i handle, for messages only
    health: str | None = None  # npu-smi's Health column: OK, Warning, Alarm, Critical, UNKNOWN
    chip_id: int | None = None  # the chip's index on its card (npu-smi info -m pairs it with the card id)

    def __str__(self) -> str:
        return f"{self.kind}:{self.id} ({self.name})"


def run_npu_smi(args: Sequence[str], timeout: float = 10) -> str:
    """stdout of `npu-smi *args`; raises NpuSmiUnavailable with one line on any failure."""
    exe = shutil.which("npu-smi")
    if exe is None:
        raise NpuSmiUnavailable(
            "npu-smi unavailable: npu-smi not found on PATH: install the Ascend driver, or mount "
            f"/usr/local/bin/npu-smi and /usr/local/Ascend/driver into the container; {CPU_HINT}")
    try:
        proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NpuSmiUnavailable(
            f"npu-smi unavailable: `npu-smi {' '.join(args)}` did not answer in {timeout:g} s; "
            f"check the driver (dmesg); {CPU_HINT}") from None
    except OSError as e:
        raise NpuSmiUnavailable(f"npu-smi unavailable: cannot run {exe}: {e}; {CPU_HINT}") from None
    # The failures print to stderr with undocumented exit codes, so look at both streams.
    check_output(proc.stdout + "\n" + proc.stderr, proc.returncode)
    return proc.stdout


def discover_npus() -> list[Device]:
    """NPUs this process can open, numbered as `InferSession(device_id=...)` takes them.

    Raises NpuSmiUnavailable when npu-smi is missing or fails, DeviceError when
    ASCEND_RT_VISIBLE_DEVICES hides every NPU.
    """
    chips = parse_info(run_npu_smi(["info"]))
    socs = {name: _soc([c for c in chips if c.name == name]) for name in {c.name for c in chips}}
    visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    if visible is None:
        pairs = [(c.acl_id, c) for c in sorted(chips, key=lambda c: c.acl_id)]  # user id = logical id
    else:
        # The process sees only the listed chips, renumbered 0..k-1 (docs/ascend.md#device-ids).
        by_logical = {c.acl_id: c for c in chips}
        listed = visible_npu_ids(visible, sorted(by_logical))
        if chips and not listed:
            raise DeviceError(f"ASCEND_RT_VISIBLE_DEVICES={visible!r} leaves no NPU visible; "
                              f"it takes ascending logical ids from {_join(sorted(by_logical))}")
        pairs = list(enumerate(by_logical[i] for i in listed))
    return [Device("npu", user, _npu_name(c.name), socs[c.name], c.acl_id, c.card_id, c.health, c.chip_id)
            for user, c in pairs]


def visible_npu_ids(value: str, present: Sequence[int]) -> list[int]:
    """Logical ids ASCEND_RT_VISIBLE_DEVICES=`value` leaves visible, in user-id order.

    CANN rule (docs/ascend.md#device-ids): comma-separated logical ids, ascending only; parsing stops
    at the first space, other character or invalid id.
    """
    ids: list[int] = []
    for part in value.split(","):
        digits = part[:len(part) - len(part.lstrip("0123456789"))]
        if not digits or int(digits) not in present or (ids and int(digits) <= ids[-1]):
            break
        ids.append(int(digits))
        if digits != part:
            break  # a space or other character ends the list
    return ids


def discover_cuda() -> list[Device]:
    """GPUs torch can see; none when torch is not installed or has no CUDA."""
    try:
        import torch  # lazily: CPU and NPU hosts need not have it
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [Device("cuda", i, torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]


def parse_devices(spec: str, npus: Callable[[], list[Device]] = discover_npus,
                  cuda: Callable[[], list[Device]] = discover_cuda) -> list[Device]:
    """Devices named by `--devices spec`, sorted by id; raises DeviceError with one line.

    `npus` and `cuda` are the discovery functions, called only when the spec needs them.
    Ids are returned in ascending order: ASCEND_RT_VISIBLE_DEVICES accepts no other.

    Examples:
        >>> [str(d) for d in parse_devices("cpu:2")]
        ['cpu:0 (cpu)', 'cpu:1 (cpu)']
    """
    text = spec.strip()
    kind, sep, ids_text = text.partition(":")
    if text == "cpu" or (kind == "cpu" and sep):
        count = 1 if not sep else _parse_ids(spec, ids_text, single=True)[0]
        if count < 1:
            raise DeviceError(f"--devices {spec}: cpu:N needs N >= 1")
        return [Device("cpu", i, "cpu") for i in range(count)]
    if kind == "cuda":
        return _pick(spec, "GPU", cuda, None if not sep else _parse_ids(spec, ids_text))
    if text == "all":
        return _pick(spec, "NPU", npus, None)
    return _pick(spec, "NPU", npus, _parse_ids(spec, text))


def _pick(spec: str, label: str, discover: Callable[[], list[Device]], wanted: list[int] | None) -> list[Device]:
    try:
        found = discover()
    except (NpuSmiUnavailable, DeviceError) as e:
        raise DeviceError(f"--devices {spec}: {e}") from e
    if not found:
        how = "npu-smi lists no chips" if label == "NPU" else "torch is missing or torch.cuda.is_available() is False"
        raise DeviceError(f"--devices {spec}: no {label} found ({how})")
    if wanted is None:
        _refuse_unhealthy(spec, found)
        return sorted(found, key=lambda d: d.id)
    by_id = {d.id: d for d in found}
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise DeviceError(f"--devices {spec}: {label} {_join(missing)} not found; present: {_describe(found)}")
    return [by_id[i] for i in sorted(wanted)]


def unhealthy(devices: Sequence[Device]) -> list[Device]:
    """NPUs whose npu-smi Health is not OK (Warning, Alarm, Critical, UNKNOWN)."""
    return [d for d in devices if d.health is not None and d.health.upper() != "OK"]


def _refuse_unhealthy(spec: str, found: list[Device]) -> None:
    """``all`` takes no chip npu-smi does not call OK: only ids named in --devices take one."""
    bad = unhealthy(found)
    if bad:
        good = [d.id for d in found if d not in bad]
        named = ", ".join(f"{d.id} ({d.health})" for d in bad)
        instead = f"--devices {','.join(map(str, good))} without it, or " if good else ""
        raise DeviceError(f"--devices {spec}: npu-smi info reports NPU {named} not OK; a run takes such a chip "
                          f"only when --devices names it: {instead}--devices "
                          f"{','.join(str(d.id) for d in sorted(found, key=lambda d: d.id))} to use it anyway")


def chip_map_disagreements(devices: Sequence[Device], chip_map: Sequence[ChipLogic]) -> list[str]:
    """Where ``npu-smi info -m``'s Chip Logic ID differs from the logical id read from ``npu-smi info``.

    Both name a chip by card id and chip id (docs/ascend.md#device-ids). On bare metal
    -m is the authority; in a container the ordinal rule of ``npu-smi info`` holds and -m
    may print host ids, so a disagreement is reported, never silently resolved.
    """
    by_chip = {(c.card_id, c.chip_id): c.logic_id for c in chip_map}
    out = []
    for d in devices:
        logic = by_chip.get((d.card_id, d.chip_id))
        if logic is None:
            out.append(f"card {d.card_id} chip {d.chip_id} (logical {d.logical_id}) is not in npu-smi info -m")
        elif logic != d.logical_id:
            out.append(f"card {d.card_id} chip {d.chip_id}: npu-smi info gives logical id {d.logical_id}, "
                       f"-m gives {logic}")
    return out


def _parse_ids(spec: str, text: str, single: bool = False) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts) or (single and len(parts) != 1):
        raise DeviceError(f"--devices: expected {FORMS}, got {spec!r}")
    ids = [int(p) for p in parts]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise DeviceError(f"--devices {spec}: {_join(repeated)} given more than once")
    return ids


def _describe(devices: list[Device]) -> str:
    """'0, 1 (Ascend310P3)'; the logical ids too when ASCEND_RT_VISIBLE_DEVICES renumbered them."""
    groups = []
    for name in dict.fromkeys(d.name for d in devices):
        same = [d for d in devices if d.name == name]
        note = name
        if any(d.logical_id is not None and d.logical_id != d.id for d in same):
            note += f"; logical {_join([d.logical_id for d in same])} via ASCEND_RT_VISIBLE_DEVICES"
        groups.append(f"{_join([d.id for d in same])} ({note})")
    return ", ".join(groups)


def _join(ids: Sequence[int | None]) -> str:
    return ", ".join(str(i) for i in ids)


def _soc(chips: list[NpuChip]) -> str | None:
    """soc_version of same-named chips, or None: only ATC needs it, and --soc-version overrides."""
    # A3 prints Name 'Ascend910'; its soc is only in the board text (docs/ascend.md#soc-version).
    board = None
    try:
        if chips[0].name.startswith("Ascend"):
            board = run_npu_smi(["info", "-t", "board", "-i", str(chips[0].card_id), "-c", str(chips[0].chip_id)])
        return soc_version(chips, board)
    except (NpuSmiUnavailable, ValueError):
        return None


def _npu_name(name: str) -> str:
    return name if name.startswith("Ascend") else "Ascend" + name


def with_soc(devices: list[Device], soc: str | None) -> list[Device]:
    """The NPUs with ``--soc-version`` as their ATC soc_version, when given: it wins over
    what discovery read, for boards whose npu-smi text does not name the chip (A3) and
    clusters whose Ray does not."""
    if soc is None:
        return devices
    return [replace(d, soc=soc) if d.kind == "npu" else d for d in devices]
