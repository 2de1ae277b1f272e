"""ONNX -> OM with Huawei's ATC, cached by ONNX hash, soc_version, batch and precision mode (docs/ascend.md#atc).

    atc_command(onnx, output_stem, soc)            the argv, exactly the published recipe
    convert_to_om(onnx, models_dir, soc, bs)       the cached OM; runs `atc` when it is missing
    om_job / cached_om / convert_job               its parts: the cache's name and key, the lookup,
                                                   the conversion (cluster.remote_atc runs it elsewhere)
    atc_version(exe)                               the CANN compiler version beside an `atc`

A cached OM is used only when its sidecar records the same ATC argv (output path
aside) and the same CANN version: an upgraded toolkit converts again.

Both default to FastPose's input (``image``, 3x256x192); another network (the
YOLOv3-SPP detector: ``input``, 3x608x608) passes ``input_name`` and ``input_chw``.

Next to each OM a ``.json`` sidecar records how it was made; ``tasks.backends.om``
reads the gears of a dynamic-batch OM from it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.cann import SET_ENV
from tasks.errors import UserError
from tasks.export import INPUT_NAME
from tasks.files import atomic_write_text, file_sha256, move_into_place
from tasks.spec import FASTPOSE

SUCCESS_LINE = "ATC run success, welcome to the next use."
#: Gears of a dynamic-batch OM when none are given (ATC's own example).
DEFAULT_GEARS = (1, 2, 4, 8, 16)
#: FastPose's input without the batch: the default of atc_command and convert_to_om.
FASTPOSE_CHW = (3, *FASTPOSE.input_hw)
#: ATC's default --precision_mode: the run records it, the argv leaves it to ATC.
DEFAULT_PRECISION = "force_fp16"
#: ATC's --precision_mode values (docs/ascend.md#precision-modes).
PRECISION_MODES = ("force_fp16", "allow_fp32_to_fp16", "must_keep_origin_dtype", "allow_mix_precision",
                   "force_fp32", "allow_mix_precision_fp16", "allow_mix_precision_bf16", "allow_fp32_to_bf16")
#: --precision_mode_v2 values, for CANN versions that replaced --precision_mode (7.0 on).
PRECISION_MODES_V2 = ("fp16", "origin", "cube_fp16in_fp32out", "mixed_float16", "mixed_bfloat16",
                      "mixed_hif8", "cube_hif8")
# 'E10007: ...', 'EZ3003: ...', 'EC0010: [PID: 1] ...': error codes start a line (docs/ascend.md#atc).
_ERROR_CODE = re.compile(r"^\s*(E[0-9A-Z]\d{4}):")
_LOADER_ERROR = "error while loading shared libraries"


class AtcError(UserError, RuntimeError):
    """ATC is missing, failed, or made no single OM; the message is one line."""


def atc_command(onnx_path: str | Path, output_stem: str | Path, soc_version: str,
                batch_size: int | None = None, gears: Sequence[int] | None = None, *,
                input_name: str = INPUT_NAME, input_chw: Sequence[int] = FASTPOSE_CHW,
                input_format: str = "NCHW", precision_mode: str = DEFAULT_PRECISION) -> list[str]:
    """The `atc` argv that turns ``onnx_path`` into ``output_stem``.om (docs/ascend.md#atc).

    ``batch_size`` makes a static OM; ``None`` a dynamic-batch one with ``gears``
    (default 1,2,4,8,16). ``output_stem`` has no ``.om``: ATC appends it.
    ``input_name`` and ``input_chw`` name the graph's one input (default FastPose's);
    ``input_format`` ND for an input that is not NCHW (the uint8 NHWC crops of
    ``tasks.deploy``'s uint8 variant, normalised in the graph). ``precision_mode``: one of
    ``PRECISION_MODES`` (``--precision_mode``) or ``PRECISION_MODES_V2``
    (``--precision_mode_v2``); the default is left to ATC, so the recipe's argv is unchanged.

    Examples:
        >>> atc_command("m.onnx", "m_bs16", "Ascend310P3", 16)[4:6]
        ['--input_format=NCHW', '--input_shape=image:16,3,256,192']
    """
    if str(output_stem).endswith(".om"):
        raise ValueError(f"output_stem {output_stem}: give it without .om, ATC appends it")
    if not soc_version:
        raise ValueError("soc_version is required (e.g. Ascend310P3; `npu-smi info` Name prefixed with Ascend)")
    batch = "-1" if batch_size is None else str(_positive(batch_size))
    chw = ",".join(str(int(d)) for d in input_chw)
    if input_format not in ("NCHW", "ND"):
        raise ValueError(f"input_format {input_format!r}: ATC takes NCHW or ND for an ONNX model")
    argv = ["atc", "--framework=5", f"--model={onnx_path}", f"--output={output_stem}", f"--input_format={input_format}",
            f"--input_shape={input_name}:{batch},{chw}"]
    if batch_size is None:
        argv.append(f"--dynamic_batch_size={','.join(str(g) for g in _gears(gears))}")
    elif gears is not None:
        raise ValueError(f"gears {list(gears)} are for a dynamic-batch OM; give batch_size=None with them")
    return argv + precision_flags(precision_mode) + [f"--soc_version={soc_version}", "--log=error"]


def precision_flags(mode: str) -> list[str]:
    """ATC's flag for ``mode``: none for its default, ``--precision_mode`` or ``--precision_mode_v2``."""
    if mode == DEFAULT_PRECISION:
        return []
    if mode in PRECISION_MODES:
        return [f"--precision_mode={mode}"]
    if mode in PRECISION_MODES_V2:
        return [f"--precision_mode_v2={mode}"]
    raise ValueError(f"precision mode {mode!r}: ATC's --precision_mode takes {', '.join(PRECISION_MODES)}; "
                     f"--precision_mode_v2 (CANN 7.0 on) {', '.join(PRECISION_MODES_V2)}")


def om_stem(onnx_path: str | Path, models_dir: str | Path, soc_version: str, batch_size: int | None = None,
            gears: Sequence[int] | None = None, sha256: str | None = None,
            precision_mode: str = DEFAULT_PRECISION) -> Path:
    """``models_dir/<onnx stem>-<onnx sha256[:12]>-<soc>-b16`` (or ``-g1_2_4``), then ``-<precision mode>``
    unless it is ATC's default; no ``.om``."""
    sha = sha256 or file_sha256(str(onnx_path))
    tag = f"b{_positive(batch_size)}" if batch_size is not None else "g" + "_".join(str(g) for g in _gears(gears))
    precision_flags(precision_mode)  # an unknown mode names no file
    mode = "" if precision_mode == DEFAULT_PRECISION else f"-{precision_mode}"
    return Path(models_dir) / f"{Path(onnx_path).stem}-{sha[:12]}-{soc_version}-{tag}{mode}"


def find_om(stem: Path) -> Path | None:
    """The finished OM for ``stem``: ``stem.om`` or ``stem_<os>_<arch>.om`` with its sidecar; the newest."""
    pattern = re.compile(re.escape(stem.name) + r"(_[a-z]+_[A-Za-z0-9_]+)?\.om")
    found = [p for p in stem.parent.glob(f"{glob_escape(stem.name)}*.om")
             if pattern.fullmatch(p.name) and p.with_suffix(".json").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


@dataclass(frozen=True)
class OmJob:
    """One conversion as the cache names it: the ONNX (by path and hash), where its OM goes, what ATC is told.

    Picklable, so another host can run it (``cluster.remote_atc``): ``convert_job`` with
    ``stem`` moved into that host's work folder makes the OM the driver's cache would hold.
    """

    onnx: Path  # as the caller has it: the sidecar records this path
    sha256: str
    stem: Path  # models_dir/<name>, no .om
    soc_version: str
    batch_size: int | None
    gears: tuple[int, ...] | None
    input_name: str = INPUT_NAME
    input_chw: tuple[int, ...] = FASTPOSE_CHW
    input_format: str = "NCHW"
    precision_mode: str = DEFAULT_PRECISION

    @property
    def want(self) -> dict:
        return {"name": self.input_name, "shape": [self.batch_size or -1, *self.input_chw]}

    def argv(self, onnx_path: str | Path, output_stem: str | Path) -> list[str]:
        return atc_command(onnx_path, output_stem, self.soc_version, self.batch_size, self.gears,
                           input_name=self.input_name, input_chw=self.input_chw, input_format=self.input_format,
                           precision_mode=self.precision_mode)

    @property
    def key(self) -> list[str]:
        return cache_key(self.argv(self.onnx, self.stem), self.sha256)


def om_job(onnx_path: str | Path, models_dir: str | Path, soc_version: str, batch_size: int | None = None,
           gears: Sequence[int] | None = None, *, input_name: str = INPUT_NAME,
           input_chw: Sequence[int] = FASTPOSE_CHW, input_format: str = "NCHW",
           precision_mode: str = DEFAULT_PRECISION, sha256: str | None = None) -> OmJob:
    """The conversion ``convert_to_om`` would run for these arguments (it hashes the ONNX unless given
    ``sha256``); AtcError when the ONNX is not there."""
    onnx_path = Path(onnx_path).resolve()
    if not onnx_path.is_file():
        raise AtcError(f"ONNX model {onnx_path} not found")
    sha = sha256 or file_sha256(str(onnx_path))
    stem = om_stem(onnx_path, models_dir, soc_version, batch_size, gears, sha, precision_mode)
    job = OmJob(onnx_path, sha, stem, soc_version, batch_size, None if gears is None else tuple(gears),
                input_name, tuple(int(d) for d in input_chw), input_format, precision_mode)
    job.argv(onnx_path, stem)  # a bad argument fails here, before any conversion
    return job


def cached_om(job: OmJob, version: str | None | object) -> Path | None:
    """The cached OM of ``job`` when its sidecar records the same input, argv and CANN ``version``
    (``ANY_VERSION``: whatever it records; for a host where nothing could convert again)."""
    cached = find_om(job.stem)
    # The name keys ONNX, soc, batch and precision; the sidecar the rest of the argv and CANN's version.
    return cached if cached is not None and _cached_fits(cached, job.want, job.key, version) else None


def convert_to_om(onnx_path: str | Path, models_dir: str | Path, soc_version: str, batch_size: int | None = None,
                  gears: Sequence[int] | None = None, timeout: float = 3600, *, input_name: str = INPUT_NAME,
                  input_chw: Sequence[int] = FASTPOSE_CHW, input_format: str = "NCHW",
                  precision_mode: str = DEFAULT_PRECISION) -> Path:
    """The OM of ``onnx_path`` for ``soc_version``; ATC runs only when it is not cached.

    Static with ``batch_size``, dynamic-batch with ``gears`` when ``batch_size`` is None.
    ATC runs in a fresh folder inside ``models_dir`` (its ``kernel_meta/`` and
    ``fusion_result.json`` stay out of the caller's cwd) and the OM is moved into
    place only when ATC succeeded, so a killed conversion is never cached.
    Raises AtcError with one line: atc missing, its exit status and E-code lines.
    """
    job = om_job(onnx_path, models_dir, soc_version, batch_size, gears, input_name=input_name,
                 input_chw=input_chw, input_format=input_format, precision_mode=precision_mode)
    exe = shutil.which("atc")
    version = atc_version(exe) if exe else None
    # Without atc on PATH the version cannot be told, and nothing could convert again anyway.
    cached = cached_om(job, version if exe else ANY_VERSION)
    if cached is not None:
        return cached
    if exe is None:
        raise AtcError(f"atc not found on PATH: source {SET_ENV} (CANN's set_env.sh), "
                       "or install the CANN toolkit that provides it")
    return convert_job(job, job.onnx, exe, version, timeout)


def convert_job(job: OmJob, onnx_path: str | Path, exe: str, version: str | None, timeout: float = 3600) -> Path:
    """Run ``exe`` (an ``atc``) on ``onnx_path`` (``job.onnx`` or a copy of it) and put the OM and its
    sidecar at ``job.stem``; the OM's path. AtcError with one line when ATC fails."""
    stem = job.stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=stem.parent, prefix=f".atc-{stem.name}-"))
    try:
        argv = job.argv(onnx_path, work / stem.name)
        made = _run_atc([exe, *argv[1:]], work, stem.name, stem.parent / f"{stem.name}.atc.log", timeout)
        om = stem.parent / made.name
        # ais_bench refuses group/other-writable model files (docs/ascend.md#ais_bench-sessions).
        os.chmod(made, 0o644)
        move_into_place(made, om)
        info = {"onnx": str(job.onnx), "onnx_sha256": job.sha256, "soc_version": job.soc_version,
                "batch_size": job.batch_size,
                "gears": None if job.batch_size is not None else list(_gears(job.gears)),
                "input": job.want, "precision_mode": job.precision_mode, "atc_version": version,
                "atc_key": job.key, "atc": argv}
        _write_json(om.with_suffix(".json"), info)
        return om
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_atc(argv: list[str], work: Path, name: str, log: Path, timeout: float) -> Path:
    """Run ATC in ``work``, its output to ``log``; the single OM it made, or AtcError (docs/ascend.md#atc)."""
    try:
        proc = subprocess.run(argv, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AtcError(f"atc did not finish in {timeout:g} s: {' '.join(argv)}") from None
    except OSError as e:
        raise AtcError(f"cannot run {argv[0]}: {e}; source {SET_ENV} (CANN's set_env.sh)") from None
    log.write_text(f"$ {' '.join(argv)}\n{proc.stdout}")
    lines = proc.stdout.splitlines()
    codes = [line.strip() for line in lines if _ERROR_CODE.match(line)]
    loader = [line.strip() for line in lines if _LOADER_ERROR in line]
    made = [p for p in work.glob(f"{glob_escape(name)}*.om") if p.is_file() and not p.is_symlink()]
    succeeded = SUCCESS_LINE in proc.stdout
    if proc.returncode == 0 and succeeded and len(made) == 1:
        return made[0]
    if loader:
        why = f"{loader[0]}: driver/CANN libraries are not on the loader path; source {SET_ENV}"
    elif codes:
        why = " | ".join(codes)
    elif proc.returncode == 0 and not succeeded:
        why = f"no {SUCCESS_LINE!r} line; last line: {_last_line(proc.stdout)!r}"
    elif proc.returncode == 0:
        why = f"made {len(made)} files {name}*.om instead of one: {sorted(p.name for p in made)}"
    else:
        why = f"no E-code line; last line: {_last_line(proc.stdout)!r}"
    raise AtcError(f"atc failed (exit status {proc.returncode}) for {name}: {why}; full output: {log}")


ANY_VERSION = object()  # a version that matches whatever the sidecar says


def cache_key(argv: Sequence[str], sha256: str) -> list[str]:
    """The ATC argv as the cache compares it: the ONNX by its hash, the output by its name, not their folders."""
    out = []
    for arg in argv[1:]:
        flag, sep, value = arg.partition("=")
        if sep and flag == "--model":
            arg = f"--model=sha256:{sha256}"
        elif sep and flag == "--output":
            arg = f"--output={Path(value).name}"
        out.append(arg)
    return out


def atc_version(exe: str | Path) -> str | None:
    """The CANN compiler version of this ``atc``: ``Version=`` of the ``version.info`` (or
    ``version.cfg``) above it (``<toolkit>/compiler/bin/atc`` -> ``<toolkit>/compiler/version.info``),
    else of ``$ASCEND_TOOLKIT_HOME/compiler``; None when no file says.

    Read from files, not by running ``atc``: CANN's install records each part's version
    there (docs/ascend.md#atc), and this runs before every cached conversion.
    """
    real = Path(os.path.realpath(exe))
    places = [real.parent, *list(real.parents)[1:3]]
    home = os.environ.get("ASCEND_TOOLKIT_HOME")
    if home:
        places += [Path(home) / "compiler", Path(home)]
    for folder in places:
        for name in ("version.info", "version.cfg"):
            version = _version_line(folder / name)
            if version:
                return version
    return None


def _version_line(path: Path) -> str | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() == "version" and value.strip():
            return value.strip()
    return None


def _cached_fits(om: Path, want: dict, key: list[str], version) -> bool:
    """The sidecar says ATC was told this input and this argv, by this CANN version."""
    try:
        info = json.loads(om.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict):
        return False
    return info.get("input") == want and info.get("atc_key") == key and \
        (version is ANY_VERSION or info.get("atc_version") == version)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?[])", r"[\1]", name)


def _gears(gears: Sequence[int] | None) -> tuple[int, ...]:
    values = tuple(DEFAULT_GEARS if gears is None else gears)
    if not 2 <= len(values) <= 100 or any(not isinstance(g, int) or g < 1 for g in values) \
            or list(values) != sorted(set(values)):
        raise ValueError(f"gears {list(values)}: ATC takes 2 to 100 distinct ascending positive batch sizes")
    return values


def _positive(batch_size: int) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r}: a positive integer, or None for a dynamic batch")
    return batch_size


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "(no output)")


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))
