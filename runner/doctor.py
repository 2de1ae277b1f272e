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
          "0.0.2 wheels ais_bench's README links, an older build; docs/ascend.md)")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str  # what was found, or what is wrong
    fix: str = ""  # what to do when not ok
    needed_for: tuple[str, ...] = ()  # backends ('om', 'onnxruntime', 'torch') or 'cuda' devices


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
        ("CUDA", ("cuda",), "a CUDA build of torch and an NVIDIA driver; or use --devices cpu / NPU ids", _cuda),
    ]
    checks = []
    for name, needed_for, fix, probe in probes:
        try:
            check = probe()
        except Exception as e:  # noqa: BLE001 - doctor reports, it never stops
            check = Check(name, False, _first_line(f"{type(e).__name__}: {e}"))
        checks.append(Check(name, check.ok, check.detail, check.fix or ("" if check.ok else fix), needed_for))
    return checks


def format_doctor(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.name:<{width}}  {'ok' if c.ok else 'MISSING':<7}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"{'':<{width}}  {'':<7}  fix: {c.fix}")
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
                                  f"ATC soc_version {', '.join(socs)}")


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
    version, generation = _version("ais_bench", interface), ais_bench_generation(interface.InferSession)
    return Check("ais_bench", True, f"{version}, {generation} ({Path(interface.__file__).parent})")


def ais_bench_generation(session_class: type) -> str:
    """Which ais_bench API this is, from its InferSession class (no device needed); the OM backend takes all.

    The 2024 source renamed ``sumary`` to ``summary`` in the commit (3ffe8a42) that made
    ``exec_time_list`` entries (start, end) pairs; before it they are durations.
    """
    if hasattr(session_class, "summary"):
        return "2024+ API: summary(), exec_time_list of (start, end) pairs, free_resource()"
    if hasattr(session_class, "free_resource"):
        return "2023 API (ait's benchmark): sumary(), exec_time_list of durations, no free_resource in aclruntime"
    return "2023 API (Ascend/tools mirror): sumary(), exec_time_list of durations, no free_resource()"


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


if __name__ == "__main__":
    print(format_doctor(doctor()))
