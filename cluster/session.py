"""The Ray a command runs on: a private one for this host's ``--devices``, or a cluster joined.

``ray_session`` yields a ``Session``: the Ray module, the devices ``--devices``
names in it and each worker's CPU share. Everything else in cluster/ takes the
session; nothing outside cluster/ calls Ray.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cluster.devices import Device, DeviceError, parse_devices, with_soc
from cluster.errors import ClusterError, first_line

#: This project's packages, shipped to a cluster's nodes: their workers then import the
#: driver's code, whatever their working directory; nodes need only the same Python packages.
CODE = [str(Path(__file__).resolve().parents[1] / name) for name in ("runner", "cluster", "tasks")]
#: Set (truthy) where a Ray node starts, Ray leaves ASCEND_RT_VISIBLE_DEVICES as it was in actors.
NOSET_NPU = "RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES"


@dataclass
class Session:
    """A Ray cluster to run on and the devices ``--devices`` names in it."""

    ray: object
    devices: list[Device]
    cpus_per_worker: float  # the CPU share of one worker: Ray's num_cpus for CPU workers
    existing: bool  # a cluster someone else started: its devices are counted, not named


def cluster_devices(spec: str, resources: dict[str, float]) -> list[Device]:
    """Devices of an existing Ray cluster, counted from ``ray.cluster_resources()``.

    Ids name devices of this host; which chip of which node an actor gets is decided
    by Ray and each node's own visibility settings, so on a cluster only kinds and
    counts can be asked for: ``all`` (one worker per NPU), ``cuda`` (one per GPU),
    ``cpu`` or ``cpu:N``.
    """
    text = spec.strip()
    if text == "cpu" or text.startswith("cpu:"):
        return parse_devices(text)  # never runs discovery
    if text not in ("all", "cuda"):
        raise DeviceError(f"--devices {spec}: ids name this host's devices and cannot pick a Ray cluster's "
                          "remote ones; use all (one worker per NPU in the cluster), cuda (one per GPU) or cpu:N")
    kind, resource = ("npu", "NPU") if text == "all" else ("cuda", "GPU")
    count = int(resources.get(resource, 0))
    if count < 1:
        have = ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if k.isupper())
        raise DeviceError(f"--devices {spec}: the Ray cluster has no {resource} resource ({have}); start its nodes "
                          f"with ray start --resources='{{\"{resource}\": N}}', or where Ray detects them")
    # Ray adds accelerator_type:<soc> per node when pyACL names the chip; ATC needs it.
    types = {k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")}
    socs = {t for t in types if t.startswith("Ascend")} if kind == "npu" else set()
    soc = socs.pop() if len(socs) == 1 else None
    return [Device(kind, i, soc or resource, soc) for i in range(count)]


def _cluster_cpus_per_worker(ray, workers: int) -> float:
    """An equal share of the cluster's CPUs that still fits on its largest node."""
    largest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=1.0)
    return max(0.01, min(ray.cluster_resources().get("CPU", 1.0) / workers, largest))


def _start_local(ray, devices: list[Device]) -> None:
    """A private Ray on this host whose NPU/GPU slots are exactly the ``--devices`` named.

    Ray maps an actor's slot through the visibility variable of the process that
    started the node (docs/ascend.md#ray-pinning), so setting it to the chosen ids here
    makes each {"NPU": 1} actor see one of them. Ray's NOSET variable, which Ray sets
    for `ray job submit` drivers and Ascend setups carry, would leave every actor seeing
    every chip: the private Ray starts without it.
    """
    env: dict[str, str | None] = {NOSET_NPU: None}
    resources = {}
    kinds = {d.kind for d in devices}
    if "npu" in kinds:
        ids = [d.logical_id if d.logical_id is not None else d.id for d in devices]
        env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(str(i) for i in sorted(ids))
        resources["NPU"] = len(ids)
    if "cuda" in kinds:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d.id) for d in devices)
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():  # None: unset while Ray starts
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    try:
        # address="local": a new private Ray even when a `ray start` cluster runs on this host.
        ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=len(devices) if "cuda" in kinds else 0,
                 resources=resources, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", configure_logging=True)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _join(ray, address: str) -> None:
    from ray.exceptions import RayError  # AuthenticationError: no or another token

    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"py_modules": CODE})
    except (ConnectionError, RuntimeError, ValueError, RayError) as e:
        raise ClusterError(f"--address {address}: cannot join a Ray cluster ({first_line(e)}); start one with "
                           "`ray start --head`, and with token authentication on, export RAY_AUTH_MODE=token and "
                           "its token (README: Many devices and hosts)") from None


@contextmanager
def ray_session(devices: str, address: str | None = None, soc_version: str | None = None) -> Iterator[Session]:
    """Start a private Ray for ``devices`` (a ``--devices`` value) on this host, or use a cluster.

    A cluster is one given by ``address`` or a Ray the caller (a test) already
    initialised; it is left running. ``soc_version`` overrides what discovery reads.
    """
    import ray

    owned = not ray.is_initialized()
    try:
        if owned and not address:
            found = with_soc(parse_devices(devices), soc_version)  # before Ray starts
            _start_local(ray, found)
            yield Session(ray, found, (os.cpu_count() or 1) / len(found), existing=False)
        else:
            if owned:
                _join(ray, address)
            found = with_soc(cluster_devices(devices, ray.cluster_resources()), soc_version)
            yield Session(ray, found, _cluster_cpus_per_worker(ray, len(found)), existing=True)
    finally:
        if owned and ray.is_initialized():
            ray.shutdown()
