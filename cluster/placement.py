"""Where each worker goes: its Ray resources, the device its backend opens, its threads, its name.

Pure functions of the devices and the backend, so a test can hold them without Ray.
"""
from __future__ import annotations

from dataclasses import dataclass

from cluster.devices import Device
from cluster.worker import WorkerPlace

def compute_device(kind: str, backend: str) -> str:
    """The device the backend opens inside an actor pinned to a ``kind`` slot.

    Ray makes the pinned accelerator device 0 of the actor's process (an NPU actor
    checks it: ``cluster.worker.pin_npu``; docs/ascend.md#ray-pinning). Only the OM
    backend runs on NPUs: torch and ONNX Runtime here have no NPU support, so on an
    NPU slot they compute on the CPU. That is deliberate and used on purpose: it runs
    Ray's real NPU scheduling and pinning (the slot, ASCEND_RT_VISIBLE_DEVICES) on
    hosts without NPUs, which is how the tests check them. The run says so in a line.
    """
    if kind == "npu":
        return "npu:0" if backend == "om" else "cpu"
    return "cuda:0" if kind == "cuda" else "cpu"


@dataclass
class Placement:
    device: Device
    options: dict  # ray actor options
    backend: str
    compute_device: str  # the device the backend opens, as the actor's process sees it
    label: str  # provisional: NPU and GPU workers are named once placed (device_label)
    threads: int

    def place(self, threads: int | None = None, opencv_threads: int = 0) -> WorkerPlace:
        """What the worker is told about where it runs; ``threads`` overrides the share."""
        return WorkerPlace(self.backend, self.compute_device, self.label, self.device.kind,
                           self.threads if threads is None else threads, opencv_threads)


def placements(devices: list[Device], backend: str, threads: int, cpus_per_worker: float) -> list[Placement]:
    out = []
    for d in devices:
        on = compute_device(d.kind, backend)
        # Ray forces OMP_NUM_THREADS=1 and ONNX Runtime ignores it anyway: threads are
        # set from the worker's share of cores whenever the backend computes on the CPU.
        share = threads or (max(1, int(cpus_per_worker)) if on == "cpu" else 1)
        if d.kind == "cpu":
            # Fractional CPUs let N workers share a host.
            options = {"num_cpus": cpus_per_worker}
        elif d.kind == "cuda":
            options = {"num_gpus": 1, "num_cpus": 0}
        else:
            # Ray sets ASCEND_RT_VISIBLE_DEVICES for an {"NPU": 1} actor: its device is 0 inside, unless
            # the node has the NOSET variable; the actor checks which (cluster.worker.pin_npu).
            options = {"resources": {"NPU": 1}, "num_cpus": 0}
        out.append(Placement(d, options, backend, on, f"{d.kind}:{d.id}", share))
    return out


def host_processes(configured: int, compute_on: str, backend: str, cpus_per_worker: float) -> int:
    """Host processes of one worker (``cluster.host_work``): ``configured``, or sized to its share of the host.

    A backend computing on the CPU owns the worker's cores, so one process is enough
    to prepare the next batch meanwhile (more would take cores from the network). A
    device (or a simulated one) leaves them to the host work: one process per core of
    the share, at most 8.
    """
    if configured:
        return configured
    if compute_on == "cpu" and backend != "sim":
        return 1
    return max(1, min(8, int(cpus_per_worker)))


def opencv_threads(prep: int, compute_on: str, backend: str, cpus_per_worker: float) -> int:
    """OpenCV's own thread pool in each of a worker's host processes: its share of cores over its processes.

    Each host process decodes and warps with OpenCV, which by default parallelises every
    call over all of the host's cores: with N workers of P processes that is N x P x
    cores threads on the same cores. A backend computing on the CPU keeps the share for
    itself, so OpenCV gets one thread there.
    """
    if compute_on == "cpu" and backend != "sim":
        return 1
    return max(1, int(cpus_per_worker) // max(1, prep))


def device_label(described: dict, devices: list[Device], existing: bool) -> str:
    """The name a placed worker's device gets in logs, throughput.json and the journal.

    Ray, not the driver, picks which of the slots an actor gets, so NPU and GPU
    workers are named from the id Ray assigned them. On this host's private Ray that
    id is the logical id the driver put in the visibility variable: named back as the
    user wrote it in ``--devices``. A worker that opened an NPU is named by the chip it
    opened (``chip``, cluster.worker.pin_npu), which is what the name must be true to.
    """
    kind = described["kind"]
    if kind == "cpu":
        return described["device"]
    ids = described["accelerator_ids"].get("NPU" if kind == "npu" else "GPU") or [described["visible_devices"]]
    assigned = str(ids[0]) if described.get("chip") is None else str(described["chip"])
    if not existing:
        for d in devices:
            own = d.logical_id if d.kind == "npu" and d.logical_id is not None else d.id
            if str(own) == assigned:
                return f"{kind}:{d.id}"
    return f"{kind}:{assigned}"


def name_devices(described: list[dict], devices: list[Device], existing: bool) -> list[str]:
    """Unique labels: ids repeat across nodes of a cluster, so those get their node too."""
    labels = [device_label(d, devices, existing) for d in described]
    repeated = {x for x in labels if labels.count(x) > 1}
    return [f"{x}@{d['node']}" if x in repeated else x for x, d in zip(labels, described)]
