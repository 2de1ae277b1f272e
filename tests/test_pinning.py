"""Which NPU a worker opens, whatever Ray did with ASCEND_RT_VISIBLE_DEVICES (docs/ascend.md#ray-pinning).

Pure functions, no Ray: ``cluster.worker.npu_user_id`` (the device id to open and the chip it
is) and ``cluster.pool.shared_chips`` (two workers on one chip). The Ray runs that exercise them
are in tests/test_om_ray.py (RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES set; two nodes on
one host).
"""
import pytest

from cluster.placement import device_label
from cluster.pool import shared_chips
from cluster.worker import PinningError, npu_user_id


@pytest.mark.parametrize("visible, assigned, expected", [
    ("3", ["3"], (0, 3)),  # Ray pinned the actor: the one visible chip is device 0
    ("0,1,2,3", ["2"], (2, 2)),  # NOSET: every chip visible; open the assigned one's index
    ("4,6", ["6"], (1, 6)),  # NOSET on a node started with ASCEND_RT_VISIBLE_DEVICES=4,6
    (None, ["1"], (1, 1)),  # NOSET and no variable: device ids are the logical ids
    (None, [], (0, 0)),  # outside Ray: the index the place names
    ("5,7", [], (0, 5)),
])
def test_the_device_opened_is_the_chip_ray_assigned(visible, assigned, expected):
    assert npu_user_id(visible, assigned) == expected


def test_an_assigned_chip_the_process_cannot_see_is_one_line():
    with pytest.raises(PinningError) as e:
        npu_user_id("0,1", ["3"])
    assert str(e.value).startswith("Ray assigned this worker NPU 3 but its ASCEND_RT_VISIBLE_DEVICES='0,1' "
                                   "does not list it") and "\n" not in str(e.value)


def test_cann_stops_reading_the_variable_at_the_first_bad_entry():
    assert npu_user_id("2,x,3", ["2"]) == (0, 2)
    with pytest.raises(PinningError):
        npu_user_id("2,x,3", ["3"])


def worker(pid: int, chip, host: str = "atlas-1") -> dict:
    return {"pid": pid, "chip": chip, "host": host}


def test_two_workers_on_one_chip_of_one_host_are_named():
    assert shared_chips([worker(11, 0), worker(12, 1)]) == ""
    assert shared_chips([worker(11, 0), worker(12, 0), worker(13, 1)]) == "chip 0 on atlas-1: pids 11, 12"
    # Chips belong to hosts: chip 0 on two hosts is two chips; workers that opened no NPU never clash.
    assert shared_chips([worker(11, 0), worker(12, 0, "atlas-2"), worker(13, None), worker(14, None)]) == ""


def test_a_worker_is_named_by_the_chip_it_opened():
    from cluster.devices import Device

    devices = [Device("npu", i, "Ascend310P3", "Ascend310P3", i) for i in (0, 1)]
    # Ray reported slot '0' for both (NOSET), but each opened its own chip: the name follows the chip.
    described = {"kind": "npu", "accelerator_ids": {"NPU": ["0"]}, "visible_devices": "0,1", "chip": 1,
                 "device": "npu:0"}
    assert device_label(described, devices, existing=False) == "npu:1"
    assert device_label(dict(described, chip=None), devices, existing=False) == "npu:0"
