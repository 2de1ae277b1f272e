"""The ATC soc_version of a run: from discovery, or ``--soc-version`` where discovery cannot tell."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO
from runner.config import ConfigError, load_config
from cluster.devices import with_soc
from cluster.session import cluster_devices
from runner.errors import RunError
from runner.plan import soc_version


def test_cluster_without_accelerator_type_needs_the_flag():
    # Ray names the chip (accelerator_type:...) only where pyACL could; otherwise ATC has no soc.
    devices = cluster_devices("all", {"NPU": 2.0, "CPU": 8.0})
    assert [(d.kind, d.id, d.soc) for d in devices] == [("npu", 0, None), ("npu", 1, None)]
    with pytest.raises(RunError, match="pass --soc-version, e.g. --soc-version Ascend310P3"):
        soc_version(devices)
    assert soc_version(with_soc(devices, "Ascend310P3")) == "Ascend310P3"


def test_the_flag_wins_over_discovery_and_leaves_other_kinds_alone():
    npus = cluster_devices("all", {"NPU": 1.0, "accelerator_type:Ascend910B": 1.0})
    assert soc_version(npus) == "Ascend910B"
    assert soc_version(with_soc(npus, "Ascend910B3")) == "Ascend910B3"
    cpus = cluster_devices("cpu:2", {"CPU": 2.0})
    assert with_soc(cpus, "Ascend310P3") == cpus and with_soc(npus, None) == npus


def test_two_chip_types_in_one_run_are_named():
    a = cluster_devices("all", {"NPU": 1.0, "accelerator_type:Ascend310P3": 1.0})
    b = cluster_devices("all", {"NPU": 1.0, "accelerator_type:Ascend910B3": 1.0})
    with pytest.raises(RunError, match=r"2 chip types \(Ascend310P3, Ascend910B3\)"):
        soc_version(a + b)


@pytest.mark.parametrize("value", ["310P3", "ascend310P3", "Ascend 310P3", 310, "Ascend910B4-", "Ascend-910B4",
                                   "Ascend910B4--1"])
def test_config_refuses_what_atc_would_not_take(value):
    with pytest.raises(ConfigError, match=r"^soc_version: .* is not an ATC soc_version such as Ascend310P3"):
        load_config(None, {"soc_version": value})
    assert load_config(None, {"soc_version": "Ascend910_9392"}).cluster.soc_version == "Ascend910_9392"
    assert load_config().cluster.soc_version is None


@pytest.mark.parametrize("value", ["Ascend910B4-1", "Ascend310P3", "Ascend910_9392", "Ascend910B2C"])
def test_real_soc_names_with_a_hyphen_are_taken(value):
    """ATC's soc list has names such as Ascend910B4-1 (docs/ascend.md#soc-version)."""
    assert load_config(None, {"soc_version": value}).cluster.soc_version == value


def test_bad_flag_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runner", "--synthetic", "4", "--soc-version", "310P3",
                           "--out", str(tmp_path / "o")], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: soc_version: '310P3' is not an ATC soc_version such as Ascend310P3 "
        "(npu-smi info shows the chip name; ATC's is Ascend plus it)"]
    assert not (tmp_path / "o").exists()
