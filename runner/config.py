"""Run configuration: YAML defaults, then ``--config FILE``, then command-line flags."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from tasks.evaluation import EVALUATORS

#: Reference backends of a parity check (runner.parity): they run in the driver, on its CPU.
CHECK_BACKENDS = ("torch", "onnxruntime", "openvino")

DEFAULTS = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A bad configuration value; one line naming the key and the fix."""


@dataclass(frozen=True)
class RunConfig:
    dataroot: str | None
    dets: str | None
    boxes: str | None
    ann: str | None
    skip_missing_images: bool
    weights: str | None
    detector_weights: str | None
    detector_cfg: str | None
    synthetic: int
    seed: int
    models_dir: str
    backend: str
    devices: str
    bs: tuple[int, ...]
    flip: bool
    fused_flip: bool
    uint8_input: bool | None  # None: auto, settled per run (runner.inputs.settle_uint8_input)
    sim_rate: float
    soc_version: str | None
    shard_size: int
    threads: int
    prep_threads: int
    device_timeout: float | None  # None: automatic (cluster.dispatch); 0: never
    straggler_factor: float  # 0: no speculative copies
    straggler_floor: float
    evaluator: str
    check_backend: str | None  # --check-backend: a reference backend for the first check_boxes boxes
    check_boxes: int
    address: str | None
    out: str
    resume: bool
    overwrite: bool
    dump_heatmaps: bool
    quiet: bool
    om_batch: str = "static"  # --backend om: static (one OM per batch size) | dynamic (one OM, a gear per bs)
    om_gears: tuple[int, ...] = ()  # set by a sweep: its batch sizes, the gears of a dynamic OM; (): cfg.bs


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
        raise ConfigError(f"{path}: a config file is a mapping of RunConfig keys to values")
    names = {f.name for f in dataclasses.fields(RunConfig)}
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
    for key in ("synthetic", "seed", "shard_size", "threads", "prep_threads"):
        if not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] < 0:
            raise ConfigError(f"{key}: {values[key]!r} is not a non-negative integer")
    if not isinstance(values["sim_rate"], (int, float)) or isinstance(values["sim_rate"], bool) \
            or values["sim_rate"] <= 0:
        raise ConfigError(f"sim_rate: {values['sim_rate']!r} is not a positive number of crops per second")
    for key in ("device_timeout", "straggler_factor", "straggler_floor"):
        value = values[key]
        if value is None and key == "device_timeout":
            continue  # automatic
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{key}: {value!r} is not a non-negative number")
    if values["check_backend"] not in (None, *CHECK_BACKENDS):
        raise ConfigError(f"check_backend: {values['check_backend']!r} is not one of {', '.join(CHECK_BACKENDS)} "
                          "(a backend that runs on this CPU)")
    if not isinstance(values["check_boxes"], int) or isinstance(values["check_boxes"], bool) \
            or values["check_boxes"] < 1:
        raise ConfigError(f"check_boxes: {values['check_boxes']!r} is not a positive number of boxes")
    if values["evaluator"] not in EVALUATORS:
        raise ConfigError(f"evaluator: {values['evaluator']!r} is not one of {', '.join(EVALUATORS)}")
    soc = values["soc_version"]
    if soc is not None and not (isinstance(soc, str) and re.fullmatch(r"Ascend\w+", soc)):
        raise ConfigError(f"soc_version: {soc!r} is not an ATC soc_version such as Ascend310P3 "
                          "(npu-smi info shows the chip name; ATC's is Ascend plus it)")
    u8 = values["uint8_input"]
    if u8 not in (True, False, "auto"):
        raise ConfigError(f"uint8_input: {u8!r} is not true, false or auto")
    values["uint8_input"] = None if u8 == "auto" else u8
    if values["fused_flip"] and not values["flip"]:
        raise ConfigError("fused_flip: a fused-flip model always runs the flip test; drop --no-flip or --fused-flip")
    if values["om_batch"] not in ("static", "dynamic"):
        raise ConfigError(f"om_batch: {values['om_batch']!r} is not static or dynamic")
    if values["om_batch"] == "dynamic" and not 2 <= len(set(values["bs"])) <= 100:
        # ATC's rule (spec ascend.md §3.4, its E10035): a dynamic-batch OM has 2 to 100 gears, the batch sizes.
        raise ConfigError(f"om_batch dynamic with bs {','.join(map(str, values['bs']))}: ATC builds a dynamic-batch "
                          "OM for 2 to 100 batch sizes (gears); give two or more (--bs 1,4,8) or use "
                          "--om-batch static")
    if values["shard_size"] < 1:
        raise ConfigError("shard_size: must be at least 1")
    return RunConfig(**values)
