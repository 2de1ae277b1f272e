"""What a command settles once, after Ray has found its devices: the backend, the model variant, the gears.

``settle(cfg, devices)`` is the only place these are decided; every run of the command
(each batch size of a sweep) reads the same ``RunPlan``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from cluster.devices import Device
from runner.config import RunConfig
from runner.errors import RunError
from tasks.variant import Variant

#: Backends whose uint8-input model gives the float model's keypoints bit for bit on a CPU
#: (tests/test_throughput.py). OpenVINO's differs in the 7th digit; on an NPU, ATC's default
#: force_fp16 may normalise in fp16, and CUDA has not been measured.
EXACT_UINT8_ON_CPU = ("onnxruntime", "torch")


@dataclass(frozen=True)
class RunPlan:
    backend: str  # the backend that runs: 'auto' resolved
    variant: Variant  # what the model file computes: fused flip, uint8 input
    flip: bool  # the flip test runs (fused or in two passes)
    gears: tuple[int, ...] | None  # a dynamic-batch OM's: the command's batch sizes; None: one static OM per size
    devices: tuple[Device, ...]
    soc_version: str | None  # the chip the OM is built for; None when the backend is not om
    precision_mode: str | None = None  # ATC's precision mode of the OM; None when the backend is not om


def settle(cfg: RunConfig, devices: list[Device]) -> list[RunPlan]:
    """The command's plans: one, or on OM one per ``--precision-mode`` (each runs like another batch size)."""
    plan = settle_one(cfg, devices)
    if plan.backend != "om":
        return [plan]
    return [replace(plan, precision_mode=mode) for mode in cfg.model.precision_modes]


def settle_one(cfg: RunConfig, devices: list[Device]) -> RunPlan:
    backend = choose_backend(cfg.backend.name, devices)
    uint8 = cfg.model.uint8_input
    if uint8 is None:
        uint8 = uint8_input_auto(backend, devices)
    om = backend == "om"
    gears = tuple(sorted(set(cfg.bs))) if om and cfg.model.om_batch == "dynamic" else None
    return RunPlan(backend, Variant(fused_flip=cfg.model.flip.fused, uint8_input=uint8), cfg.model.flip.flip,
                   gears, tuple(devices), soc_version(devices) if om else None,
                   cfg.model.precision_modes[0] if om else None)


def choose_backend(name: str, devices: list[Device]) -> str:
    """``auto``: OM on NPUs, else ONNX Runtime (faster than PyTorch on CPU, measured)."""
    kinds = {d.kind for d in devices}
    if len(kinds) > 1:
        raise RunError(f"--devices mixes {', '.join(sorted(kinds))}; run one kind per command")
    if name != "auto":
        return name
    return "om" if "npu" in kinds else "onnxruntime"


def uint8_input_auto(backend: str, devices: list[Device]) -> bool:
    """``uint8_input: auto``: on where the host's own cores run the network and the in-graph
    normalisation is the host's bit for bit, ONNX Runtime and PyTorch on CPU devices.

    There the host's normalisation and float mirror take cores from the network
    (every other thread costs ONNX Runtime about twice its CPU time on a busy host),
    while inside the graph they cost it nothing measurable: the backend alone 1.001 of
    the float model's speed, end to end +1.9% (2 cores, bs 16; docs/throughput.md).
    """
    return backend in EXACT_UINT8_ON_CPU and all(d.kind == "cpu" for d in devices)


def soc_version(devices: list[Device]) -> str:
    """The one chip type ATC builds an OM for."""
    socs = {d.soc for d in devices}
    if None in socs:
        raise RunError("cannot tell the NPUs' soc_version for ATC (npu-smi, or Ray on a cluster, does not name "
                       "the chip): pass --soc-version, e.g. --soc-version Ascend310P3")
    if len(socs) != 1:
        raise RunError(f"the devices of one run are of {len(socs)} chip types ({', '.join(sorted(socs))}); "
                       "an OM is built for one: name devices of one type in --devices")
    return socs.pop()
