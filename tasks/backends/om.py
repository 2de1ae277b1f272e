"""OM backend: an ATC-converted FastPose on one Ascend NPU through ais_bench (docs/ascend.md#ais_bench-sessions).

A static OM has its batch baked in: the short last batch is padded by repeating its
last crop and the padded rows are dropped. A dynamic-batch OM runs every call of a
run at one gear, the smallest that holds ``batch_size`` (a sweep's gears are its
batch sizes, so the run's own), with ``mode='dymbatch'``, and pads the short last
batch the same way: a run then measures, and computes, what the static OM of its
batch size does. Setting ``batch_size`` selects the gear again (a sweep's next run).
The gears come from the ``.json`` that ``tasks.atc.convert_to_om`` writes beside it.
Device seconds are the model executions ais_bench timed (``exec_time_list``), copies
excluded. The outputs come to the host by one copy, into the caller's ``out`` (a
worker's shared slot) where given: ``infer(..., out_array=False)`` hands out the
session's tensors where the build's ``infer`` takes that parameter, so ``infer``'s own
copy is not made as well.

Every ais_bench build in use works here, and nothing is inferred from a build's
date or from a parameter's name: what the session has decides (docs/ascend.md#ais_bench-sessions).
The summary calls are ``summary()``/``reset_summaryinfo()`` or ``sumary()``/
``reset_sumaryinfo()``; an ``exec_time_list`` entry is a duration or a ``(start_ms,
end_ms)`` pair, told apart by its form; ``free_resource()`` is called where it exists;
a dynamic-batch gear is selected by the ``dymbatch`` mode where the session's mode
table (``infer_mode_switch``) has it, else by ``set_dynamic_batchsize`` and a
``static`` call (ait before 2023-09-08 had ``out_array`` but no mode table and ignored
an unknown mode). Before 2023-09-11 the session's ACL context is current only on the
thread that made it, so the caller must open, run and close a backend on one thread
(``cluster.worker.DeviceWorker`` does).
"""
from __future__ import annotations

import inspect
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from tasks.backends.base import BackendUnavailable, deliver
from tasks.backends.sessions import OmModelError, om_session, output_file
from tasks.spec import FASTPOSE
from tasks.variant import Variant

OUTPUT_CHW = (FASTPOSE.num_joints, *FASTPOSE.heatmap_hw)


class OmBackend:
    """One ais_bench session; open, run and close it on one thread (module docstring)."""

    def __init__(self, model_path: str, device: str, batch_size: int, threads: int,
                 variant: Variant = Variant(), *, gears: Sequence[int] | None = None) -> None:
        """``gears``: those of a dynamic-batch OM, when it has no sidecar ``.json``."""
        self.session = om_session(model_path, device)
        self.path = Path(model_path)
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
            self._select_gear = self.gears is not None and not dymbatch_mode(self.session)
            # ait from 2023-05 and ais_bench 2024 hand out the output tensors on request; the 2023 mirror cannot
            self._tensors = "out_array" in inspect.signature(self.session.infer).parameters
        except BackendUnavailable:
            self.close()
            raise
        self._reset()  # from an empty list: each call counts only its own executions

    def _read_descriptors(self, gears: Sequence[int] | None) -> tuple[int, ...] | None:
        """Check the OM's one input and one output; its gears when its batch is dynamic."""
        name = self.path.name
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise OmModelError(f"OM {name} has {len(inputs)} inputs and {len(outputs)} outputs; FastPose has 1 and 1")
        (inp,), (out,) = inputs, outputs
        kind = str(inp.datatype).rpartition(".")[2]  # 'dtype.float32': by name (docs/ascend.md#ais_bench-sessions)
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

    def run(self, x: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        n = len(x)
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"OmBackend.run got {n} crops; it takes 1..{self.batch_size}: split before calling")
        if tuple(x.shape[1:]) != self._item:
            raise ValueError(f"OmBackend.run got shape {list(x.shape)}; expected [n, {_dims(self._item)}]")
        rows = self.batch_size if self.gear is None else self.gear
        feed = np.ascontiguousarray(x, dtype=self._dtype)
        if rows > n:
            feed = np.concatenate([feed, np.repeat(feed[-1:], rows - n, axis=0)])
        try:
            outputs = self._infer(feed, rows)
        except RuntimeError as e:
            # aclruntime raises a bare code; the reason it printed went to this process's stdout.
            where = output_file() or "this worker's stdout"
            raise RuntimeError(f"{e} (aclruntime's [ERROR] lines: {where})") from e
        heatmaps = outputs[0].reshape(rows, *OUTPUT_CHW)[:n]
        if out is None and self._tensors:  # the session's buffer: ours to keep only as a copy
            heatmaps = np.array(heatmaps, dtype=np.float32)
        return deliver(heatmaps, out), self._take_exec_ms() / 1000

    def _infer(self, feed: np.ndarray, rows: int) -> list[np.ndarray]:
        """The outputs in host memory: the session's own buffers where ``infer`` can hand out its tensors
        (``out_array=False``: ``run`` then copies once, into ``out``), else ``infer``'s arrays."""
        tensors = {"out_array": False} if self._tensors else {}
        if self.gears is None:
            outputs = self.session.infer([feed], "static", **tensors)
        elif self._select_gear:
            self.session.set_dynamic_batchsize(rows)
            outputs = self.session.infer([feed], "static", **tensors)
        else:
            outputs = self.session.infer([feed], "dymbatch", **tensors)
        if not self._tensors:
            return [np.asarray(o) for o in outputs]
        for t in outputs:
            t.to_host()
        return [np.asarray(t) for t in outputs]

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
        (docs/ascend.md#ais_bench-sessions): left to whoever owns the process.
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
                       "and aclruntime wheels built together (docs/ascend.md#ais_bench-sessions)")


def execution_ms(entries: Iterable) -> float:
    """Total milliseconds of ``exec_time_list`` entries, summed in float64.

    Before ait 8c67f6f51 (2023-10-09) an entry is one execution's duration; since then
    it is a ``(start, end)`` pair of float32 ms since the session was created, so a long
    run's stamps are coarse (1/16 ms after 9 minutes, 1 ms after 2.3 hours) and only their
    difference is kept. The form of each entry decides, not the build.
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


def dymbatch_mode(session) -> bool:
    """Whether ``infer(..., 'dymbatch')`` selects the gear: the session's mode table says so.

    Builds with a mode table (``infer_mode_switch``, ait from 2023-09-08 on) dispatch
    through it and reset the gear on 'static'; builds without one know no 'dymbatch'
    (ait before then ignores it silently, the Ascend/tools mirror raises), and there
    ``set_dynamic_batchsize`` and a 'static' call, which keeps the gear, run it.
    """
    table = getattr(session, "infer_mode_switch", None)
    if table is None:
        if not hasattr(session, "set_dynamic_batchsize"):
            raise OmModelError("om backend: this ais_bench InferSession has neither a mode table nor "
                               "set_dynamic_batchsize(): it cannot run a dynamic-batch OM; use --om-batch static")
        return False
    if "dymbatch" not in table:
        raise OmModelError(f"om backend: this ais_bench's modes are {', '.join(sorted(table))}, no dymbatch: "
                           "it cannot run a dynamic-batch OM; use --om-batch static")
    return True
