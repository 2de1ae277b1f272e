"""OM backend: an ATC-converted FastPose on one Ascend NPU through ais_bench (spec ascend.md §1.10).

A static OM has its batch baked in: the short last batch is padded by repeating its
last crop and the padded rows are dropped. A dynamic-batch OM runs every call of a
run at one gear, the smallest that holds ``batch_size`` (a sweep's gears are its
batch sizes, so the run's own), with ``mode='dymbatch'``, and pads the short last
batch the same way: a run then measures, and computes, what the static OM of its
batch size does. Setting ``batch_size`` selects the gear again (a sweep's next run).
The gears come from the ``.json`` that ``tasks.atc.convert_to_om`` writes beside it.
Device seconds are the model executions ais_bench timed (``exec_time_list``), copies
excluded.

Three ais_bench generations are in use and all work here: the 2023 Ascend/tools
mirror (``sumary()``, no ``out_array``, no ``free_resource``), ait's 2023 packaged
benchmark, which the prebuilt wheels carry (``sumary()``, ``out_array``, ``dymbatch``),
and the source from 2024 on (``summary()``, ``free_resource()``). Before 2024-02 an
``exec_time_list`` entry is one execution's duration in ms, since then a
``(start_ms, end_ms)`` pair. In the 2023 builds the session's ACL context is current
only on the thread that made it, so the caller must open, run and close a backend on
one thread (``cluster.actor.Worker`` does).
"""
from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from tasks.backends.base import BackendUnavailable
from tasks.cann import SET_ENV
from tasks.deploy import Variant
from tasks.spec import FASTPOSE

#: CANN's environment script in its two install layouts: ascend-toolkit/ (before CANN 8.5), cann/ (8.5 on).
#: What an error line tells the user to source.
OM_MAX_BYTES = 10 * 1024 ** 3
#: aclruntime (2024-08 on) refuses a model path with more '/' than this (File::IsPathDepthValid).
PATH_DEPTH_MAX = 32
OUTPUT_CHW = (FASTPOSE.num_joints, *FASTPOSE.heatmap_hw)
# ais_bench refuses model paths with other characters (path_security_check.py).
_PATH_CHARS = re.compile(r"[^_A-Za-z0-9/.-]")


class OmModelError(BackendUnavailable):
    """The OM file cannot be opened as it is (ais_bench's file rules, its batch or shape); one line."""


def check_model_file(path: Path) -> None:
    """Raise OmModelError if ais_bench (2024-08 onward) would refuse ``path`` (spec §1.2).

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


class OmBackend:
    """One ais_bench session; open, run and close it on one thread (module docstring)."""

    def __init__(self, model_path: str, device: str, batch_size: int, threads: int,
                 variant: Variant = Variant(), *, gears: Sequence[int] | None = None) -> None:
        """``gears``: those of a dynamic-batch OM, when it has no sidecar ``.json``."""
        try:
            from ais_bench.infer.interface import InferSession
        except ImportError as e:
            raise BackendUnavailable(
                f"om backend: cannot import ais_bench ({e}): install the ais_bench and aclruntime wheels "
                f"(not on PyPI; see docs/ascend.md) and source {SET_ENV}") from None
        path = Path(model_path)
        check_model_file(path)
        device_id = npu_index(device)
        try:
            self.session = InferSession(device_id, str(path))
        except (RuntimeError, ValueError, TypeError) as e:
            raise BackendUnavailable(
                f"om backend: InferSession({device_id}, {path}) failed: {e}; see the [ERROR] lines above: "
                "`npu-smi info` for a busy or unhealthy device, and the soc_version the OM was built for "
                f"(its .json) against this chip") from e
        self.path = path
        self._batch_size = batch_size
        self.gear: int | None = None  # the batch every call runs at, for a dynamic-batch OM
        self.variant = variant
        self._dtype = np.dtype(variant.input_dtype())
        self._item = tuple(variant.input_shape(0)[1:])
        try:
            self.gears = self._read_descriptors(gears)
            self.batch_size = batch_size  # selects the gear
            # Method names, not bound methods: a bound method would keep the session
            # (and its model on the device) alive after close().
            self._summary_name, self._reset_name = summary_methods(self.session)
        except BackendUnavailable:
            self.close()
            raise
        # The 2023 Ascend/tools build has no 'dymbatch' mode (nor out_array, which came with it):
        # there the gear is selected first and the call runs 'static'.
        self._select_gear = self.gears is not None and "out_array" not in _parameters(self.session.infer)
        self._reset()  # from an empty list: each call counts only its own executions

    def _read_descriptors(self, gears: Sequence[int] | None) -> tuple[int, ...] | None:
        """Check the OM's one input and one output; its gears when its batch is dynamic."""
        name = self.path.name
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise OmModelError(f"OM {name} has {len(inputs)} inputs and {len(outputs)} outputs; FastPose has 1 and 1")
        (inp,), (out,) = inputs, outputs
        kind = str(inp.datatype).rpartition(".")[2]  # 'dtype.float32': match by name (spec §1.3)
        shape = list(inp.shape)
        if kind != self._dtype.name or len(shape) != 4 or tuple(shape[1:]) != self._item:
            raise OmModelError(f"OM {name} takes {kind} {shape}; this run sends {self._dtype.name} "
                               f"[B, {_dims(self._item)}] (--uint8-input decides which)")
        if tuple(out.shape[1:]) != OUTPUT_CHW:
            raise OmModelError(f"OM {name} returns {list(out.shape)}; expected [B, {_dims(OUTPUT_CHW)}]")
        if shape[0] != -1:
            if shape[0] != self.batch_size:
                raise OmModelError(
                    f"--bs {self.batch_size} but OM {name} was built for batch {shape[0]}: convert it with "
                    f"batch_size={self.batch_size} (tasks.atc.convert_to_om) or run with --bs {shape[0]}")
            return None
        if gears is None:
            sidecar = self.path.with_suffix(".json")
            try:
                gears = json.loads(sidecar.read_text())["gears"]
            except (OSError, ValueError, KeyError, TypeError):
                gears = None
            if not gears:
                raise OmModelError(f"OM {name} has a dynamic batch but {sidecar} lists no gears: convert it with "
                                   "tasks.atc.convert_to_om, or pass gears=")
        return tuple(sorted(int(g) for g in gears))

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        """The most crops per call; on a dynamic-batch OM also the gear every call runs at."""
        if self.gears is not None:
            fits = [g for g in self.gears if g >= value]
            if not fits:
                raise OmModelError(f"--bs {value} but OM {self.path.name} has batch gears {list(self.gears)}: "
                                   f"use --bs {self.gears[-1]} or less, or convert it with a larger gear")
            self.gear = fits[0]
        self._batch_size = value

    def run(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        n = len(x)
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"OmBackend.run got {n} crops; it takes 1..{self.batch_size}: split before calling")
        if tuple(x.shape[1:]) != self._item:
            raise ValueError(f"OmBackend.run got shape {list(x.shape)}; expected [n, {_dims(self._item)}]")
        rows = self.batch_size if self.gear is None else self.gear
        feed = np.ascontiguousarray(x, dtype=self._dtype)
        if rows > n:
            feed = np.concatenate([feed, np.repeat(feed[-1:], rows - n, axis=0)])
        if self.gears is None:
            outputs = self.session.infer([feed], "static")
        elif self._select_gear:
            self.session.set_dynamic_batchsize(rows)
            outputs = self.session.infer([feed], "static")
        else:
            outputs = self.session.infer([feed], "dymbatch")
        heatmaps = np.asarray(outputs[0], dtype=np.float32).reshape(rows, *OUTPUT_CHW)[:n]
        return heatmaps, self._take_exec_ms() / 1000

    def _take_exec_ms(self) -> float:
        """The executions timed since the last call, in ms; then ais_bench's list is cleared.

        Each read of ``exec_time_list`` copies the whole list (pybind ``def_readwrite``):
        read once per call and reset, it stays one entry long, so a read costs the same
        at the 200,000th call as at the first.
        """
        entries = getattr(self.session, self._summary_name)().exec_time_list
        self._reset()
        return execution_ms(entries)

    def _reset(self) -> None:
        getattr(self.session, self._reset_name)()

    def close(self) -> None:
        """Unload the model: ``free_resource()`` where the build has it; dropping the session does the rest.

        Builds without ``free_resource`` unload when the session object is destroyed,
        so nothing here may keep a reference to it. ``finalize()`` is process-wide
        (spec §1.8): left to whoever owns the process.
        """
        session, self.session = getattr(self, "session", None), None
        if session is not None and hasattr(session, "free_resource"):
            session.free_resource()


def summary_methods(session) -> tuple[str, str]:
    """The names of the session's summary and reset calls: 2024 builds spell them right, 2023 builds 'sumary'."""
    for names in (("summary", "reset_summaryinfo"), ("sumary", "reset_sumaryinfo")):
        if all(hasattr(session, name) for name in names):
            return names
    raise BackendUnavailable(f"om backend: this ais_bench InferSession has neither summary()/reset_summaryinfo() nor "
                       f"sumary()/reset_sumaryinfo() ({type(session).__module__}): install the ais_bench "
                       "and aclruntime wheels built together (docs/ascend.md)")


def execution_ms(entries: Iterable) -> float:
    """Total milliseconds of ``exec_time_list`` entries, summed in float64.

    Before ais_bench 3ffe8a42 (2024-02) an entry is one execution's duration; since
    then it is a ``(start, end)`` pair of float32 ms since the session was created, so
    a long run's stamps are coarse (1/16 ms after 9 minutes, 1 ms after 2.3 hours) and only their difference is kept.
    """
    total = 0.0
    for entry in entries:
        if isinstance(entry, (tuple, list)):
            start, end = entry
            total += float(end) - float(start)
        else:
            total += float(entry)
    return total


def _dims(shape: tuple[int, ...]) -> str:
    return ", ".join(str(d) for d in shape)


def _parameters(fn) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()
