"""`python -m runner doctor --bundle FILE.tar.gz`: what a first Atlas host sends back (docs/ascend.md#send-back).

    write_bundle(path, out, models_dir) -> list[str]   the names of the files written into the archive

Only what the checklist asks for, each file made here from a known source: the
doctor's table, ``npu-smi info`` and ``info -m``, versions, the ais_bench observations,
the last run's run.json, devices.json and the ATC logs and sidecars of its model. No
environment dump and nothing from Ray's session folder: those hold tokens and
addresses. A part that cannot be had becomes a one-line note in its file.
"""
from __future__ import annotations

import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

#: Files a bundle never takes, whatever folder they are found in: they may hold secrets.
NEVER = ("token", "secret", "password", ".env", "environ")


def write_bundle(path: str | Path, out: str | Path = "out", models_dir: str | Path | None = None,
                 doctor_text: str | None = None) -> list[str]:
    """Write the archive to ``path``; ``out`` is the run (or sweep) folder whose last run.json is taken,
    ``doctor_text`` the doctor's table when the caller has it already."""
    files: dict[str, bytes] = {}
    files["doctor.txt"] = (doctor_text if doctor_text is not None else _doctor_text()).encode()
    for name, args in (("npu-smi-info.txt", ["info"]), ("npu-smi-info-m.txt", ["info", "-m"])):
        files[name] = _npu_smi(args).encode()
    files["versions.json"] = json.dumps(_versions(), indent=1).encode()
    files["ais_bench.json"] = json.dumps(_ais_bench(), indent=1).encode()
    files.update(_last_run(Path(out), models_dir))
    names = sorted(n for n in files if not any(bad in n.lower() for bad in NEVER))
    manifest = f"runner first-host bundle, {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n" + "\n".join(names) + "\n"
    files["MANIFEST.txt"] = manifest.encode()
    names = ["MANIFEST.txt", *names]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            info = tarfile.TarInfo(f"runner-bundle/{name}")
            info.size, info.mtime, info.mode = len(files[name]), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    return names


def _doctor_text() -> str:
    from runner.doctor import doctor, format_doctor

    return format_doctor(doctor()) + "\n"


def _npu_smi(args: list[str]) -> str:
    """The command's stdout and stderr as printed, or why it could not run."""
    exe = shutil.which("npu-smi")
    if exe is None:
        return "npu-smi not found on PATH\n"
    try:
        proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"npu-smi {' '.join(args)}: {e}\n"
    return f"$ npu-smi {' '.join(args)}  (exit status {proc.returncode})\n{proc.stdout}{proc.stderr}"


def _versions() -> dict:
    from runner.outputs import versions
    from tasks.atc import atc_version

    found: dict = {"packages": versions(), "python": sys.version, "machine": platform.machine(),
                   "platform": platform.platform()}
    atc = shutil.which("atc")
    found["atc"] = {"path": atc, "version": atc_version(atc) if atc else None}
    driver = Path("/usr/local/Ascend/driver/version.info")
    found["driver_version_info"] = driver.read_text(errors="replace") if driver.is_file() else None
    found["toolkits"] = {str(p): sorted(c.name for c in p.iterdir()) if p.is_dir() else None
                         for p in (Path("/usr/local/Ascend/ascend-toolkit"), Path("/usr/local/Ascend/cann"))}
    found["wheels"] = _wheel_origins()
    return found


def _wheel_origins() -> dict:
    """Where aclruntime and ais_bench were installed from: their dist-info's direct_url.json, if any."""
    import importlib.metadata as md

    out = {}
    for name in ("aclruntime", "ais_bench"):
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            out[name] = None
            continue
        out[name] = {"version": dist.version, "direct_url": dist.read_text("direct_url.json")}
    return out


def _ais_bench() -> dict:
    try:
        from ais_bench.infer import interface
    except ImportError as e:
        return {"importable": False, "error": str(e).splitlines()[0] if str(e) else type(e).__name__}
    from runner.doctor import ais_bench_observations

    return {"importable": True, "file": interface.__file__, **ais_bench_observations(interface.InferSession)}


def _last_run(out: Path, models_dir: str | Path | None) -> dict[str, bytes]:
    """The newest run.json under ``out`` (a run, or a sweep's bs folders), its devices.json, and the
    ATC log and sidecar of the OM it ran, from its models dir."""
    runs = sorted(out.glob("run.json"), key=os.path.getmtime) + sorted(out.glob("*/run.json"), key=os.path.getmtime)
    if not runs:
        return {"last-run/NONE.txt": f"no run.json under {out}\n".encode()}
    run_file = max(runs, key=os.path.getmtime)
    files = {"last-run/run.json": run_file.read_bytes()}
    if (run_file.parent / "devices.json").is_file():
        files["last-run/devices.json"] = (run_file.parent / "devices.json").read_bytes()
    record = json.loads(run_file.read_text())
    model = Path(record.get("model_path") or "")
    folder = Path(models_dir or record.get("config", {}).get("models_dir") or model.parent)
    if model.suffix == ".om":
        for extra in [model.with_suffix(".json"), *sorted(folder.glob(f"{model.stem.split('_linux')[0]}*.atc.log"))]:
            if extra.is_file():
                files[f"last-run/models/{extra.name}"] = extra.read_bytes()
    return files
