"""The runtimes' sessions, opened one way for every model (FastPose and the detector).

    onnxruntime_session(path, device, threads) -> onnxruntime.InferenceSession
    om_session(path, device)                   -> ais_bench InferSession

What is the model's own (its input checks, padding, decode) stays with the model's
backend; how a runtime is set up, and the error lines when it cannot be, is here.
"""
from __future__ import annotations

import ctypes
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.backends.base import BackendUnavailable
from tasks.cann import SET_ENV

#: ais_bench's largest model file.
OM_MAX_BYTES = 10 * 1024 ** 3
#: aclruntime (2024-08 on) refuses a model path with more '/' than this (File::IsPathDepthValid).
PATH_DEPTH_MAX = 32
# ais_bench refuses model paths with other characters (path_security_check.py).
_PATH_CHARS = re.compile(r"[^_A-Za-z0-9/.-]")


class OmModelError(BackendUnavailable):
    """The OM file cannot be opened as it is (ais_bench's file rules, its batch or shape); one line."""


def check_model_file(path: Path) -> None:
    """Raise OmModelError if ais_bench (2024-08 onward) would refuse ``path`` (docs/ascend.md#ais_bench-sessions).

    ais_bench raises a bare ``ValueError`` (its Python checks) or ``RuntimeError``
    (aclruntime's) that points to its log; this names the file, the rule and the fix.
    """
    full = Path(os.path.abspath(path))
    if not full.is_file():
        raise OmModelError(f"OM model {full} not found (or not a file)")
    if full.suffix != ".om":
        raise OmModelError(f"OM model {full}: ais_bench loads only files ending in .om")
    if full.is_symlink():
        raise OmModelError(f"OM model {full} is a symlink, which ais_bench refuses: use the file itself "
                           f"({os.path.realpath(full)}) or copy it")
    if _PATH_CHARS.search(str(full)):
        raise OmModelError(f"OM model path {full} has characters ais_bench refuses (it allows A-Z a-z 0-9 _ - . /): "
                           "move it, e.g. with --models-dir")
    depth = str(full).count("/")
    if depth > PATH_DEPTH_MAX:
        raise OmModelError(f"OM model path {full} has {depth} '/' separators; aclruntime refuses more than "
                           f"{PATH_DEPTH_MAX} (PATH_DEPTH_MAX): move it higher up, e.g. with --models-dir")
    st = full.stat()
    if st.st_uid != os.geteuid() and st.st_gid not in os.getgroups():
        raise OmModelError(f"OM model {full} belongs to uid {st.st_uid} gid {st.st_gid}, neither this user nor "
                           "one of its groups; ais_bench refuses it: copy it (cp) or chown it to this user")
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OmModelError(f"OM model {full} has mode {mode:#o}; ais_bench refuses group/other-writable files "
                           f"(at most 0o755): chmod 644 {full}")
    if not mode & stat.S_IRUSR or not os.access(full, os.R_OK):
        raise OmModelError(f"OM model {full} is not readable by this user (mode {mode:#o}): chmod 644 {full}")
    if st.st_size > OM_MAX_BYTES:
        raise OmModelError(f"OM model {full} is {st.st_size} bytes; ais_bench loads at most 10 GB")


def npu_index(device: str) -> int:
    """'npu:3' -> 3, 'npu' -> 0: the ACL user id this process opens (a Python int)."""
    kind, _, index = device.partition(":")
    if kind != "npu" or (index and not index.isdigit()):
        raise BackendUnavailable(f"om backend runs on NPUs ('npu:N'), got device {device!r}: "
                                 "use --devices 0,1 (NPU ids) with --backend om")
    return int(index or 0)


def onnxruntime_session(model_path: str | Path, device: str, threads: int):
    """An ONNX Runtime session on ``device`` ('cpu', or 'cuda:N' with the CPU as fallback).

    ONNX Runtime ignores OMP_NUM_THREADS: without ``threads`` it takes every core of
    the host and oversubscribes when several workers share it.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendUnavailable(f"onnxruntime backend: {e}; pip install onnxruntime") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers: list = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable("onnxruntime backend: no CUDA provider in this onnxruntime "
                                     "(pip install onnxruntime-gpu, or use --devices cpu)")
        index = int(device.split(":")[1]) if ":" in device else 0
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
    return ort.InferenceSession(str(model_path), opts, providers=providers)


def om_session(model_path: str | Path, device: str):
    """An ais_bench ``InferSession`` over an OM file that ais_bench's own rules accept.

    Open, run and close it on one thread: before 2024 its ACL context is current
    only on the thread that made it (``cluster.worker.DeviceWorker`` keeps to that).
    """
    try:
        from ais_bench.infer.interface import InferSession
    except ImportError as e:
        raise BackendUnavailable(
            f"om backend: cannot import ais_bench ({e}): install the ais_bench and aclruntime wheels "
            f"(not on PyPI; see docs/ascend.md#install) and source {SET_ENV}") from None
    path = Path(model_path)
    check_model_file(path)
    device_id = npu_index(device)
    with captured_output() as printed:
        try:
            return InferSession(device_id, str(path))
        except (RuntimeError, ValueError, TypeError) as e:
            error = e
    # aclruntime prints the reason (printf, Log.h ERROR_LOG) and raises only a code such as
    # [1][ACL:invalid parameter]: the printed lines end the error (docs/ascend.md#errors).
    raise BackendUnavailable(
        f"om backend: InferSession({device_id}, {path}) failed: {error}; check `npu-smi info` for a busy or "
        f"unhealthy device and the OM's soc_version (its .json) against this chip; {_reason(printed)}") from error


def _reason(printed: list[str]) -> str:
    # One line, and no '. ' in it: Ray's report of a failed actor is cut at its first sentence.
    lines = [" ".join(line.split()).rstrip(".") for line in "".join(printed).splitlines() if line.strip()]
    if lines:
        return "aclruntime printed: " + " | ".join(lines[-6:])
    where = output_file()
    return f"aclruntime's [ERROR] lines, if any, are in {where}" if where else \
        "aclruntime printed nothing this process could read back"


def output_file() -> str | None:
    """The file this process's stdout (fd 1) writes to, when it is one: a Ray worker's log file."""
    try:
        target = os.readlink("/proc/self/fd/1")
    except OSError:
        return None
    return target if target.startswith("/") and os.path.isfile(target) else None


@contextmanager
def captured_output() -> Iterator[list[str]]:
    """What is written to file descriptors 1 and 2 inside the block, from C or Python; appended to the
    list on the way out, and written on to the original descriptors, so the worker's log keeps it.

    The C side's stdio buffer is flushed first (a printf to a file waits there), and so are
    Python's. Another thread's output in the meantime is captured too, and passed on the same way.
    """
    text: list[str] = []
    _flush_all()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield text
        finally:
            _flush_all()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            data = sink.read()
            if data:
                os.write(1, data)
            text.append(data.decode(errors="replace"))


def _flush_all() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
