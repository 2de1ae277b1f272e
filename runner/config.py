"""Run configuration: YAML defaults, then ``--config FILE``, then command-line flags.

The YAML keys and flags are flat (``configs/default.yaml`` states every default, once);
``load_config`` checks them and files them into frozen sections, one per concern.
What depends on the devices Ray finds (the backend ``auto`` picks, uint8 input ``auto``)
is settled once per command into a ``runner.plan.RunPlan``, never set later.
"""
from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from cluster.queue import DispatchPolicy
from tasks.backends.sim import GIL_MODES
from tasks.errors import UserError
from tasks.evaluation import EVALUATORS

#: Reference backends of a parity check (runner.parity): they run in the driver, on its CPU.
CHECK_BACKENDS = ("torch", "onnxruntime", "openvino")

DEFAULTS = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class ConfigError(UserError, ValueError):
    """A bad configuration value; one line naming the key and the fix."""


class FlipMode(str, enum.Enum):
    """The flip test: none, two passes merged on the host, or one fused call (``--fused-flip``)."""

    OFF = "off"
    TWO_PASS = "two-pass"
    FUSED = "fused"

    @property
    def flip(self) -> bool:
        return self is not FlipMode.OFF

    @property
    def fused(self) -> bool:
        return self is FlipMode.FUSED


@dataclass(frozen=True)
class DataConfig:
    dataroot: str | None
    dets: str | None  # a COCO results file of person boxes
    boxes: str | None  # 'gt': the ground-truth person boxes
    ann: str | None  # default DATAROOT/annotations/person_keypoints_val2017.json
    skip_missing_images: bool
    synthetic: int  # N > 0: N synthetic boxes and a seeded random FastPose
    seed: int
    detector_weights: str | None  # yolov3-spp.weights: write --dets with the detector first
    detector_cfg: str | None


@dataclass(frozen=True)
class ModelConfig:
    weights: str | None
    models_dir: str  # cache of exported ONNX / OM files
    flip: FlipMode
    uint8_input: bool | None  # None: auto, settled in the run's plan (runner.plan)
    om_batch: str  # static (one OM per batch size) | dynamic (one OM, a gear per batch size)
    precision_modes: tuple[str, ...]  # ATC's --precision_mode (or _v2) of the OM; several run like several bs


@dataclass(frozen=True)
class BackendConfig:
    name: str  # auto | torch | onnxruntime | openvino | om | sim
    threads: int  # per worker; 0: its share of the host's cores
    host_processes: int  # per worker; 0: sized to the host (cluster.placement.host_processes)
    sim_rate: float  # crops a second of a simulated device
    sim_gil: str  # hold | release: whether a sim device keeps the GIL during its call (tasks.backends.sim)
    allow_opencv_mismatch: bool  # run although OpenCV's warpAffine is not the pose crop's rule (tasks.opencv_check)


@dataclass(frozen=True)
class ClusterConfig:
    devices: str  # 0,1 | all | cuda:0,1 | cpu | cpu:N
    address: str | None  # an existing Ray cluster: auto or HOST:PORT
    soc_version: str | None  # ATC's soc_version where npu-smi or Ray cannot name the chip
    ship_images: str  # auto | always | never: the JPEG bytes travel in the shards of workers whose node lacks them


@dataclass(frozen=True)
class EvalConfig:
    evaluator: str
    check_backend: str | None  # a reference backend for the first check_boxes boxes (runner.parity)
    check_boxes: int


@dataclass(frozen=True)
class OutputConfig:
    out: str
    resume: bool
    overwrite: bool
    dump_heatmaps: bool
    quiet: bool
    report: bool = True  # timeline.json always; analysis.json and report.html unless false (--no-report)


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig
    model: ModelConfig
    backend: BackendConfig
    cluster: ClusterConfig
    queue: DispatchPolicy
    evaluation: EvalConfig
    output: OutputConfig
    bs: tuple[int, ...]  # several: a sweep
    shard_size: int  # boxes per shard, rounded up to whole batches


#: Each flat key (YAML, flags) -> (section, field).
#: --ship-images: auto sends the images in the shards of workers whose node cannot see them.
SHIP_IMAGES = ("auto", "always", "never")
KEYS = {
    **{k: ("data", k) for k in ("dataroot", "dets", "boxes", "ann", "skip_missing_images", "synthetic", "seed",
                                "detector_weights", "detector_cfg")},
    **{k: ("model", k) for k in ("weights", "models_dir", "uint8_input", "om_batch")},
    "precision_mode": ("model", "precision_modes"),
    "backend": ("backend", "name"), "threads": ("backend", "threads"), "host_processes": ("backend", "host_processes"),
    "sim_rate": ("backend", "sim_rate"),
    "sim_gil": ("backend", "sim_gil"), "allow_opencv_mismatch": ("backend", "allow_opencv_mismatch"),
    **{k: ("cluster", k) for k in ("devices", "address", "soc_version", "ship_images")},
    "device_timeout": ("queue", "device_timeout_s"), "straggler_factor": ("queue", "straggler_factor"),
    "straggler_floor": ("queue", "straggler_floor_s"),
    **{k: ("evaluation", k) for k in ("evaluator", "check_backend", "check_boxes")},
    **{k: ("output", k) for k in ("out", "resume", "overwrite", "dump_heatmaps", "quiet", "report")},
}
#: Flat keys that are not a section's field as they are: ``flip`` and ``fused_flip`` make one FlipMode.
OTHER_KEYS = ("bs", "shard_size", "flip", "fused_flip")


def parse_bs(value) -> tuple[int, ...]:
    """``16``, ``"1,4,8"`` or ``[1, 4]`` -> ``(1, 4, 8)``."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        sizes = tuple(int(v) for v in items)
    except ValueError:
        raise ConfigError(f"bs: {value!r} is not a batch size or a comma-separated list of them") from None
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError(f"bs: {value!r}: batch sizes must be positive integers")
    return sizes


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file is a mapping of the keys in {DEFAULTS.name} to values")
    names = set(KEYS) | set(OTHER_KEYS)
    for key in data:
        if key not in names:
            raise ConfigError(f"{path}: Unknown config key: {key} (known: {', '.join(sorted(names))})")
    return data


def load_config(config_file: str | None = None, overrides: dict | None = None) -> RunConfig:
    values = _read_yaml(DEFAULTS)
    if config_file:
        values.update(_read_yaml(Path(config_file)))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values["bs"] = parse_bs(values["bs"])
    _check_numbers(values)
    _check_choices(values)
    sections: dict[str, dict] = {}
    for key, (section, name) in KEYS.items():
        sections.setdefault(section, {})[name] = values[key]
    sections["model"]["uint8_input"] = None if values["uint8_input"] == "auto" else values["uint8_input"]
    sections["model"]["flip"] = (FlipMode.OFF if not values["flip"] else
                                 FlipMode.FUSED if values["fused_flip"] else FlipMode.TWO_PASS)
    return RunConfig(data=DataConfig(**sections["data"]), model=ModelConfig(**sections["model"]),
                     backend=BackendConfig(**sections["backend"]), cluster=ClusterConfig(**sections["cluster"]),
                     queue=DispatchPolicy(**sections["queue"]), evaluation=EvalConfig(**sections["evaluation"]),
                     output=OutputConfig(**sections["output"]), bs=values["bs"], shard_size=values["shard_size"])


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_numbers(values: dict) -> None:
    for key in ("synthetic", "seed", "shard_size", "threads", "host_processes"):
        if not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] < 0:
            raise ConfigError(f"{key}: {values[key]!r} is not a non-negative integer")
    if values["shard_size"] < 1:
        raise ConfigError("shard_size: must be at least 1")
    if not _is_number(values["sim_rate"]) or values["sim_rate"] <= 0:
        raise ConfigError(f"sim_rate: {values['sim_rate']!r} is not a positive number of crops per second")
    for key in ("device_timeout", "straggler_factor", "straggler_floor"):
        value = values[key]
        if value is None and key == "device_timeout":
            continue  # automatic
        if not _is_number(value) or value < 0:
            raise ConfigError(f"{key}: {value!r} is not a non-negative number")
    if not isinstance(values["check_boxes"], int) or isinstance(values["check_boxes"], bool) \
            or values["check_boxes"] < 1:
        raise ConfigError(f"check_boxes: {values['check_boxes']!r} is not a positive number of boxes")


def _check_choices(values: dict) -> None:
    if values["check_backend"] not in (None, *CHECK_BACKENDS):
        raise ConfigError(f"check_backend: {values['check_backend']!r} is not one of {', '.join(CHECK_BACKENDS)} "
                          "(a backend that runs on this CPU)")
    if values["evaluator"] not in EVALUATORS:
        raise ConfigError(f"evaluator: {values['evaluator']!r} is not one of {', '.join(EVALUATORS)}")
    check_soc_version(values["soc_version"])
    if values["uint8_input"] not in (True, False, "auto"):
        raise ConfigError(f"uint8_input: {values['uint8_input']!r} is not true, false or auto")
    if values["fused_flip"] and not values["flip"]:
        raise ConfigError("fused_flip: a fused-flip model always runs the flip test; drop --no-flip or --fused-flip")
    if values["ship_images"] not in SHIP_IMAGES:
        raise ConfigError(f"ship_images: {values['ship_images']!r} is not one of {', '.join(SHIP_IMAGES)}")
    if values["sim_gil"] not in GIL_MODES:
        raise ConfigError(f"sim_gil: {values['sim_gil']!r} is not one of {', '.join(GIL_MODES)}")
    if values["om_batch"] not in ("static", "dynamic"):
        raise ConfigError(f"om_batch: {values['om_batch']!r} is not static or dynamic")
    values["precision_mode"] = precision_modes(values["precision_mode"])
    if values["om_batch"] == "dynamic" and not 2 <= len(set(values["bs"])) <= 100:
        # ATC's rule (its E10035): a dynamic-batch OM has 2 to 100 gears, the batch sizes.
        raise ConfigError(f"om_batch dynamic with bs {','.join(map(str, values['bs']))}: ATC builds a dynamic-batch "
                          "OM for 2 to 100 batch sizes (gears); give two or more (--bs 1,4,8) or use "
                          "--om-batch static")


def precision_modes(value) -> tuple[str, ...]:
    """``force_fp16``, ``"force_fp16,must_keep_origin_dtype"`` or a list -> the modes, each checked, none twice."""
    modes = tuple(str(m).strip() for m in (value if isinstance(value, (list, tuple)) else str(value).split(",")))
    for mode in modes:
        check_precision_mode(mode)
    if len(set(modes)) != len(modes):
        raise ConfigError(f"precision_mode: {','.join(modes)} names a mode twice")
    return modes


def check_precision_mode(mode) -> None:
    """One of ATC's --precision_mode values, or a --precision_mode_v2 one (docs/ascend.md#precision-modes)."""
    from tasks.atc import PRECISION_MODES, PRECISION_MODES_V2

    if mode not in PRECISION_MODES + PRECISION_MODES_V2:
        raise ConfigError(f"precision_mode: {mode!r} is not one of ATC's --precision_mode values "
                          f"({', '.join(PRECISION_MODES)}) nor a --precision_mode_v2 one (CANN 7.0 on: "
                          f"{', '.join(PRECISION_MODES_V2)})")


def check_soc_version(soc) -> None:
    """None (npu-smi or Ray names the chip), or an ATC soc_version: 'Ascend' and letters, digits, '_'
    and inner hyphens (Ascend910B4-1, Ascend910_9392; docs/ascend.md#soc-version)."""
    if soc is not None and not (isinstance(soc, str) and re.fullmatch(r"Ascend\w+(-\w+)*", soc)):
        raise ConfigError(f"soc_version: {soc!r} is not an ATC soc_version such as Ascend310P3 "
                          "(npu-smi info shows the chip name; ATC's is Ascend plus it)")


def flat(cfg: RunConfig) -> dict:
    """The configuration as its flat keys: what run.json records and ``--resume`` compares."""
    out = {key: getattr(getattr(cfg, section), name) for key, (section, name) in KEYS.items()}
    out["uint8_input"] = "auto" if cfg.model.uint8_input is None else cfg.model.uint8_input
    out["precision_mode"] = ",".join(cfg.model.precision_modes)
    out.update(bs=list(cfg.bs), shard_size=cfg.shard_size, flip=cfg.model.flip.flip,
               fused_flip=cfg.model.flip.fused)
    return out


def changed(cfg: RunConfig, **values) -> RunConfig:
    """``cfg`` with some of its flat keys (``bs`` and the ``KEYS``) set anew: the runs ``bench`` makes."""
    top, sections = {}, {}
    for key, value in values.items():
        if key in ("bs", "shard_size"):
            top[key] = parse_bs(value) if key == "bs" else value
        elif key in KEYS:
            section, name = KEYS[key]
            sections.setdefault(section, {})[name] = value
        else:
            raise ConfigError(f"{key}: not a key that can be changed after loading")
    return dataclasses.replace(cfg, **top, **{s: dataclasses.replace(getattr(cfg, s), **v)
                                             for s, v in sections.items()})
