"""`python -m runner doctor`: what a run needs on this host, each ok or missing with its fix.

    doctor()              -> list[Check]   never raises: a failing probe is a missing check
    format_doctor(checks) -> str           the table, then which backends are ready
"""
from __future__ import annotations

import importlib
import os
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.cann import SET_ENV, SET_ENV_SCRIPTS  # torch-free: doctor runs on hosts without it

ALL = ("torch", "onnxruntime", "om")  # the backends; a check needed by every one lists them all
# ais_bench's README links prebuilt wheels (cp37-cp312 since 2024-08) but says they are not the newest build.
WHEELS = ("install the ais_bench and aclruntime wheels (not on PyPI: build them from source, or take the prebuilt "
          "0.0.2 wheels ais_bench's README links, an older build; docs/ascend.md#install)")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str  # what was found, or what is wrong
    fix: str = ""  # what to do when not ok
    needed_for: tuple[str, ...] = ()  # backends ('om', 'onnxruntime', 'torch') or 'cuda' devices
    warning: str = ""  # ok, but something a run treats with care (an NPU whose Health is not OK)


def doctor() -> list[Check]:
    """Probe this host; each probe that raises becomes a missing check with the error's first line."""
    probes: list[tuple[str, tuple[str, ...], str, Callable[[], Check]]] = [
        ("python", ALL, "", _python),
        ("npu-smi", ("om",), "install the Ascend driver (it provides npu-smi), or mount /usr/local/bin/npu-smi "
                             "and /usr/local/Ascend/driver into the container", _npu_smi),
        ("CANN env", ("om",), f"source {SET_ENV}", _cann_env),
        ("atc", ("om",), f"source {SET_ENV} (CANN's set_env.sh), or install the CANN toolkit", _atc),
        ("aclruntime", ("om",), f"{WHEELS}, then source {SET_ENV}", lambda: _module("aclruntime")),
        ("ais_bench", ("om",), f"{WHEELS}, then source {SET_ENV}", _ais_bench),
        ("ray", ALL, "pip install 'ray[default]'", lambda: _module("ray")),
        ("onnxruntime", ("onnxruntime", "om"), "pip install onnxruntime (onnxruntime-gpu for CUDA)", _onnxruntime),
        ("onnx export", ("onnxruntime", "om"), "pip install onnx onnxsim", _onnx_export),
        ("torch", ALL, "pip install torch", lambda: _module("torch")),
        ("opencv warp", ALL, "install requirements.txt's opencv-python-headless, or run with "
                             "--allow-opencv-mismatch", _opencv_warp),
        ("CUDA", ("cuda",), "a CUDA build of torch and an NVIDIA driver; or use --devices cpu / NPU ids", _cuda),
    ]
    checks = []
    for name, needed_for, fix, probe in probes:
        try:
            check = probe()
        except Exception as e:  # noqa: BLE001 - doctor reports, it never stops
            check = Check(name, False, _first_line(f"{type(e).__name__}: {e}"))
        checks.append(Check(name, check.ok, check.detail, check.fix or ("" if check.ok else fix), needed_for,
                            check.warning))
    return checks


def format_doctor(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        status = "MISSING" if not c.ok else "WARNING" if c.warning else "ok"
        lines.append(f"{c.name:<{width}}  {status:<7}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"{'':<{width}}  {'':<7}  fix: {c.fix}")
        if c.warning:
            lines.append(f"{'':<{width}}  {'':<7}  warning: {c.warning}")
    lines.append("")
    for backend in ALL:
        missing = [c.name for c in checks if backend in c.needed_for and not c.ok]
        lines.append(f"--backend {backend}: " + ("ready" if not missing else f"not ready ({', '.join(missing)})"))
    cuda = next((c for c in checks if c.name == "CUDA"), None)
    if cuda is not None:
        lines.append("--devices cuda: " + ("ready" if cuda.ok else "not available"))
    return "\n".join(lines)


def _python() -> Check:
    return Check("python", True, f"{platform.python_version()} ({sys.executable})")


def _npu_smi() -> Check:
    from cluster.devices import discover_npus
    from cluster.npu_smi import CPU_HINT

    if shutil.which("npu-smi") is None:
        return Check("npu-smi", False, "npu-smi not found on PATH")
    try:
        npus = discover_npus()
    except Exception as e:  # noqa: BLE001 - NpuSmiUnavailable, DeviceError: their text says why and what to do
        why = str(e).removeprefix("npu-smi unavailable: ").removesuffix(f"; {CPU_HINT}")
        return Check("npu-smi", False, why, "as the line above says; send the output of `npu-smi info` if unclear")
    if not npus:
        return Check("npu-smi", False, "npu-smi lists no NPU chips", "check `npu-smi info` and the driver")
    socs = sorted({d.soc or "unknown soc: pass --soc-version" for d in npus})
    ids = ", ".join(str(d.id) for d in npus)
    return Check("npu-smi", True, f"{len(npus)} NPU(s): ids {ids} ({', '.join(sorted({d.name for d in npus}))}); "
                                  f"ATC soc_version {', '.join(socs)}{_chip_map_note(npus)}",
                 warning=_health_warning(npus))


def _health_warning(npus) -> str:
    """Chips npu-smi does not call OK: ``--devices all`` leaves them out, named ids take them."""
    from cluster.devices import unhealthy

    bad = unhealthy(npus)
    if not bad:
        return ""
    return (f"npu-smi info reports NPU {', '.join(f'{d.id} Health {d.health}' for d in bad)}: a run refuses it "
            "unless --devices names it (docs/ascend.md#chip-health)")


def _chip_map_note(npus) -> str:
    """'; npu-smi info -m agrees' (or what differs): the cross-check of logical ids (docs/ascend.md#device-ids)."""
    from cluster.devices import chip_map_disagreements, run_npu_smi
    from cluster.npu_smi import parse_chip_map

    try:
        chip_map = parse_chip_map(run_npu_smi(["info", "-m"]))
    except Exception as e:  # noqa: BLE001 - older drivers lack -m; the check is a cross-check only
        return f"; npu-smi info -m not read ({_first_line(str(e))[:120]})"
    differ = chip_map_disagreements(npus, chip_map)
    return "; npu-smi info -m agrees" if not differ else f"; npu-smi info -m DISAGREES: {'; '.join(differ)}"


def _cann_env() -> Check:
    # set_env.sh exports ASCEND_TOOLKIT_HOME; CANN 8 also ASCEND_HOME_PATH.
    var = next((v for v in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH") if os.environ.get(v)), None)
    home = os.environ.get(var) if var else None
    if home and Path(home).is_dir():
        return Check("CANN env", True, f"{var}={home}{_cann_version(Path(home))}")
    if home:
        return Check("CANN env", False, f"{var}={home} does not exist",
                     f"reinstall the CANN toolkit, then source {SET_ENV}")
    script = installed_set_env()
    if script:
        return Check("CANN env", False, f"ASCEND_TOOLKIT_HOME is unset: {script} exists but is not sourced "
                                        "in this shell", f"source {script}")
    return Check("CANN env", False, f"ASCEND_TOOLKIT_HOME is unset and there is no {' nor '.join(SET_ENV_SCRIPTS)}",
                 f"install the CANN toolkit (Ascend-cann-toolkit_*.run --install) and driver, then source {SET_ENV}")


def installed_set_env() -> str | None:
    """The first of CANN's set_env.sh layouts present on this host (ascend-toolkit/, or cann/ from CANN 8.5)."""
    return next((s for s in SET_ENV_SCRIPTS if Path(s).is_file()), None)


def _cann_version(home: Path) -> str:
    """', version 8.0.0' from the toolkit's version files when present (layout varies by release)."""
    for name in ("version.cfg", "compiler/version.info", "runtime/version.info"):
        try:
            text = (home / name).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip().lower() == "version":
                return f", version {value.strip()}"
    return ""


def _atc() -> Check:
    exe = shutil.which("atc")
    if exe is None:
        return Check("atc", False, "atc not found on PATH")
    return Check("atc", True, exe)


def _module(name: str) -> Check:
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        return Check(name, False, _first_line(f"cannot import {name}: {e}"))
    return Check(name, True, f"{_version(name, module)} ({Path(module.__file__ or '?').parent})")


def _ais_bench() -> Check:
    try:
        from ais_bench.infer import interface
    except ImportError as e:
        return Check("ais_bench", False, _first_line(f"cannot import ais_bench.infer.interface: {e}"))
    version, seen = _version("ais_bench", interface), ais_bench_observations(interface.InferSession)
    return Check("ais_bench", True, f"{version}; {describe_observations(seen)} ({Path(interface.__file__).parent})")


def ais_bench_observations(session_class: type) -> dict:
    """What this ais_bench and aclruntime have, read from their classes (no device, no session).

    Observed, not inferred from a date: the OM backend decides each point the same way
    from the session it opens (docs/ascend.md#ais_bench-sessions). The mode table is set
    in InferSession's constructor, so it is read from the constructor's source; the
    timing entry form from the aclruntime binding's signature of ``exec_time_list``.
    """
    import inspect

    try:
        infer = list(inspect.signature(session_class.infer).parameters)
    except (TypeError, ValueError, AttributeError):
        infer = None
    try:  # the constructors of the class and its bases
        table = any("infer_mode_switch" in inspect.getsource(k.__init__)
                    for k in session_class.__mro__ if "__init__" in vars(k) and k is not object)
    except (OSError, TypeError):
        table = None  # a compiled build: seen when a session opens (devices.json)
    methods = [m for m in ("summary", "sumary", "reset_summaryinfo", "reset_sumaryinfo", "set_dynamic_batchsize",
                           "finalize") if hasattr(session_class, m)]
    return {"methods": methods, "free_resource": hasattr(session_class, "free_resource"),
            "infer_parameters": infer, "mode_table": table, "exec_time_list": _timing_form()}


def _timing_form() -> str | None:
    """'pairs' or 'durations', from the docstring pybind gives ``exec_time_list``; None when it says neither."""
    import aclruntime

    for value in vars(aclruntime).values():
        prop = getattr(value, "exec_time_list", None) if isinstance(value, type) else None
        doc = str(getattr(prop, "__doc__", "") or "")
        if "Tuple[float, float]" in doc or "tuple[float, float]" in doc:
            return "pairs"
        if "List[float]" in doc or "list[float]" in doc:
            return "durations"
    return None


def describe_observations(seen: dict) -> str:
    """The observations as one line of the doctor's table."""
    infer = "infer(" + ", ".join(seen["infer_parameters"]) + ")" if seen["infer_parameters"] else "infer: unreadable"
    table = {True: "mode table (dymbatch by mode)", False: "no mode table (dymbatch by set_dynamic_batchsize)",
             None: "mode table: not readable here"}[seen["mode_table"]]
    form = {"pairs": "(start, end) pairs", "durations": "durations"}.get(seen["exec_time_list"], "not readable here")
    return (f"{', '.join(m + '()' for m in seen['methods'])}; free_resource: "
            f"{'yes' if seen['free_resource'] else 'no'}; {infer}; {table}; exec_time_list entries: {form}")


def _onnxruntime() -> Check:
    check = _module("onnxruntime")
    if not check.ok:
        return check
    import onnxruntime

    return Check("onnxruntime", True, f"{onnxruntime.__version__}; providers "
                                      f"{', '.join(onnxruntime.get_available_providers())}")


def _onnx_export() -> Check:
    found, missing = [], []
    for name in ("onnx", "onnxsim"):
        try:
            found.append(f"{name} {_version(name, importlib.import_module(name))}")
        except ImportError:
            missing.append(name)
    if missing:
        return Check("onnx export", False, f"cannot import {', '.join(missing)} (pth -> ONNX export needs them)")
    return Check("onnx export", True, ", ".join(found))


def _cuda() -> Check:
    try:
        import torch
    except ImportError:
        return Check("CUDA", False, "torch is not installed")
    if not torch.cuda.is_available():
        return Check("CUDA", False, f"torch {torch.__version__}: torch.cuda.is_available() is False")
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return Check("CUDA", True, f"{torch.cuda.device_count()} GPU(s) ({', '.join(names)}), CUDA {torch.version.cuda}")


def _version(name: str, module) -> str:
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(name)
        except Exception:  # noqa: BLE001 - wheels built from source may carry no metadata
            version = "version unknown"
    return str(version)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


def _opencv_warp() -> Check:
    """The pose crop's warp on this OpenCV against its fixed-point rule (tasks.opencv_check), cached per build."""
    import cv2

    from tasks.opencv_check import cache_dir, checked_warp

    mismatch = checked_warp(cache_dir())
    return Check("opencv warp", mismatch is None, mismatch or f"OpenCV {cv2.__version__}: the fixed-point rule")


if __name__ == "__main__":
    print(format_doctor(doctor()))
