"""The pose stage's device worker: boxes -> crops -> network (normal and mirrored) -> keypoints.

``Worker`` is a ``cluster.worker.DeviceWorker``: its device thread owns the session
and makes the backend calls of ``tasks.pipeline`` back to back. The host work runs
in its ``cluster.host_work.HostPool`` processes, not its own (aclruntime keeps the
GIL while the device computes): ``prepare_into`` reads, crops and writes a chunk's
network inputs (``chunk_boxes``: one or more device batches) into a shared slot,
the device thread runs them batch by batch and writes the
outputs beside them, ``decode_from`` merges and decodes them there. The device
thread also starts each of these steps, between two device calls, so nothing else
in the worker's process runs while a shard is in flight (``run_shard`` only waits).
The worker holds no numerics of its own and returns keypoints keyed by box id,
never heatmaps unless asked to dump them on its own side.
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np

from cluster.host_work import ArraySpec, HostProcess, HostState, SlotWriter, slot_room
from cluster.staging import ShippedModel, local_model
from cluster.worker import DeviceWorker, ShardDropped, WorkerPlace
from tasks.backends import open_backend
from tasks.dataset import Box, ImageError, decode_rgb, read_rgb
from tasks.decode import decode_keypoints
from tasks.files import atomic_file, file_size
from tasks.opencv_check import check_opencv
from tasks.pipeline import merge_heatmaps, network_inputs, output_shape, prepare_batch, run_network, warm_up
from tasks.variant import Variant, bytes_per_box


@dataclass(frozen=True)
class WorkerConfig:
    place: WorkerPlace
    model_path: str
    batch_size: int
    host_processes: int = 1
    flip: bool = True
    dump_dir: str | None = None  # write merged heatmaps here, per shard
    variant: Variant = Variant()  # what the model file computes (tasks.deploy)
    sim_rate: float = 0.0  # network inputs per second, for the sim backend
    sim_gil: str = "hold"  # the sim backend keeps the GIL for its call ('hold', as aclruntime) or not
    allow_opencv_mismatch: bool = False  # crop although OpenCV's warp is not the rule (tasks.opencv_check)
    slot_boxes: int = 0  # the largest chunk of the command (a sweep's, chunk_boxes): sizes the slots; 0: batch_size's
    model: ShippedModel | None = None  # the model's bytes in Ray's object store, where nodes may not see model_path
    data_sample: tuple[tuple[str, int], ...] = ()  # (path, size) of a few of the run's images: does this node see them?


@dataclass
class Shard:
    id: int
    boxes: list[Box]
    image_paths: dict[int, str]
    # the files' bytes, read where they are, for a worker whose node cannot see image_paths (--ship-images)
    image_bytes: dict[int, bytes] | None = None


@dataclass
class ShardResult:
    shard_id: int
    device: str
    box_ids: np.ndarray  # int64 [n]
    keypoints: np.ndarray  # float32 [n, 17, 3]
    crop_boxes: np.ndarray  # float32 [n, 4]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (box id, reason)
    crops: int = 0  # network inputs computed (padding excluded)
    calls: int = 0
    device_seconds: float = 0.0  # backend compute only
    busy_seconds: float = 0.0  # holding the device: the backend calls
    bytes_to_device: int = 0
    bytes_from_device: int = 0
    started: float = 0.0  # unix time
    finished: float = 0.0
    # device seconds of each backend call, in call order: the reducer's latency distribution
    call_seconds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    # unix seconds at which each of those calls began (float64: float32 cannot hold a unix time to the ms)
    call_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    host_seconds: dict[str, float] = field(default_factory=dict)  # per stage, HOST_STAGES


#: The host stages a shard times (seconds summed over its chunks), by where they run.
#: Host processes: read_decode, crop, input (before the device), flip_merge, decode_keypoints
#: (after). The worker's device thread: slot_wait (a chunk next in line for a slot while none is
#: free), prep_wait (the device thread idle, a shard in flight, before the chunk's calls).
#: What each counts: cluster.reducer.LABELS.
PREP_STAGES = ("read_decode", "crop", "input")
POST_STAGES = ("flip_merge", "decode_keypoints")
WAIT_STAGES = ("slot_wait", "prep_wait")
HOST_STAGES = PREP_STAGES + POST_STAGES + WAIT_STAGES


# ---------------------------------------------------------------- in a host process


@dataclass
class PreparedInputs:
    """A chunk's host work before the device: its inputs lie in the slot (``inputs``; none: no usable box)."""

    box_ids: np.ndarray  # int64 [n]
    crop_boxes: np.ndarray  # float32 [n, 4]
    skipped: list[tuple[int, str]]
    inputs: list[ArraySpec]
    seconds: dict[str, float]  # PREP_STAGES


def prepare_into(state: HostState, slot: int, boxes: list[Box], paths: dict[int, str], variant: Variant,
                 flip: bool, data: dict[int, bytes] | None = None) -> PreparedInputs:
    """Read (or decode from ``data``, shipped), crop and build the network inputs of ``boxes`` into ``slot``:
    a host process's work."""
    t0 = time.perf_counter()
    images, skipped = {}, []
    for image_id in dict.fromkeys(b.image_id for b in boxes):
        read = read_rgb if not data or image_id not in data else partial(decode_rgb, data[image_id])
        try:
            images[image_id] = state.images.get(paths[image_id], read)
        except ImageError as e:
            skipped += [(b.id, str(e)) for b in boxes if b.image_id == image_id]
    usable = [b for b in boxes if b.image_id in images]
    t1 = time.perf_counter()
    if not usable:
        return PreparedInputs(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), skipped, [],
                              {"read_decode": t1 - t0})
    prepared = prepare_batch(usable, images)
    t2 = time.perf_counter()
    writer = state.memory.writer(slot)
    network_inputs(prepared.crops, variant, flip, writer.empty)
    specs = writer.specs
    t3 = time.perf_counter()
    return PreparedInputs(prepared.box_ids, prepared.crop_boxes, skipped, specs,
                          {"read_decode": t1 - t0, "crop": t2 - t1, "input": t3 - t2})


@dataclass
class DecodedBatch:
    keypoints: np.ndarray  # float32 [n, 17, 3]
    heatmaps: np.ndarray | None  # the merged heatmaps, only when they are dumped
    seconds: dict[str, float]  # POST_STAGES


def decode_from(state: HostState, outputs: list[ArraySpec], crop_boxes: np.ndarray, dump: bool) -> DecodedBatch:
    """Merge the flip passes the device thread left in the slot and decode them: a host process's work."""
    t0 = time.perf_counter()
    heatmaps = merge_heatmaps(state.memory.views(outputs))
    t1 = time.perf_counter()
    keypoints = decode_keypoints(heatmaps, crop_boxes)
    t2 = time.perf_counter()
    return DecodedBatch(keypoints, np.array(heatmaps) if dump else None,
                        {"flip_merge": t1 - t0, "decode_keypoints": t2 - t1})


# ---------------------------------------------------------------- on the worker's device thread


@dataclass
class RanBatch:
    """What the device thread did with one chunk."""

    prepared: PreparedInputs
    prep_wait: float  # the device thread sat idle this long before the chunk (cluster.worker.DeviceWorker)
    calls: list[float] = field(default_factory=list)  # device seconds of each call
    starts: list[float] = field(default_factory=list)  # unix time each call began
    busy: float = 0.0  # seconds holding the device
    crops: int = 0
    bytes_to_device: int = 0
    bytes_from_device: int = 0


@dataclass
class _ShardRun:
    """A shard on the device thread: its chunks, and each one's (RanBatch, DecodedBatch | None) when back."""

    shard: Shard
    done: Future  # -> (ShardResult, merged heatmaps to dump)
    host: HostProcess  # every chunk of the shard prepared in one process: its image cache
    back: list
    left: int
    result: ShardResult
    stages: dict[str, float] = field(default_factory=lambda: dict.fromkeys(HOST_STAGES, 0.0))


#: A host process prepares at least this many boxes a request, a whole number of device batches: the device
#: thread's own work per request (two answers, their callbacks and pickles: ~0.3 ms) then comes once for
#: several small batches' calls. With the GIL held through each call it is device time lost: at bs 1 on a
#: fake NPU of 0.5 ms a call, end to end was 0.80 of the device alone with one batch a request.
CHUNK_BOXES = 16


def chunk_boxes(batch_size: int) -> int:
    """Boxes a host process prepares a request at ``batch_size``: the batch, or enough of them for CHUNK_BOXES."""
    return batch_size * -(-CHUNK_BOXES // batch_size)


def pose_slot_bytes(variant: Variant, flip: bool, boxes: int) -> int:
    """Room for one chunk of ``boxes``: its inputs and the device's outputs, every pass."""
    per_box = bytes_per_box(variant, flip)
    passes = 2 if flip and not variant.fused_flip else 1
    return slot_room([boxes * per_box["to_device"] // passes] * passes
                     + [boxes * per_box["from_device"] // passes] * passes)


class Worker(DeviceWorker):
    """A shard's chunks each take a slot, are prepared in a host process, run on the device thread and
    decoded in a host process; the device thread starts each step between two device calls."""

    def __init__(self, config: WorkerConfig) -> None:
        # Before the session opens: a crop by another warp would move every keypoint.
        self.opencv_mismatch = check_opencv(config.allow_opencv_mismatch)
        super().__init__(config)
        boxes = max(config.slot_boxes, chunk_boxes(config.batch_size))
        self.start_host(config.host_processes, pose_slot_bytes(config.variant, config.flip, boxes))
        self._slots = self.host.slots

    def describe(self) -> dict:
        import cv2

        return {**super().describe(), "opencv": cv2.__version__, "opencv_warp_mismatch": self.opencv_mismatch,
                "host_processes": [p.pid for p in self.host.processes], "model_source": self.model_source,
                "model_opened": self.model_opened, "data_missing": first_missing(self.config.data_sample)}

    def open_session(self, config: WorkerConfig):
        place = config.place
        self.model_opened, self.model_source = config.model_path, "local"
        if config.model is not None:  # this node may lack the driver's file, or hold another (cluster.staging)
            path, self.model_source = local_model(config.model)
            self.model_opened = str(path)
        return open_backend(place.backend, self.model_opened, place.compute_device, config.batch_size,
                            place.threads, config.variant, config.sim_rate, config.sim_gil)

    def warm_up(self, backend, config: WorkerConfig) -> None:
        warm_up(backend, config.flip)

    def set_batch(self, model_path: str, batch_size: int, dump_dir: str | None = None,
                  model: ShippedModel | None = None) -> None:
        """Run the next shards at ``batch_size`` (a sweep's next run), dumping heatmaps to ``dump_dir``.

        The backend is reopened only when the model file changes (a static OM is
        built per batch size); a dynamic-batch session (ONNX, torch) is kept. The
        work runs on the device thread; its error is raised here.
        """
        if chunk_boxes(batch_size) > self._slots.slot_bytes // pose_slot_bytes(self.config.variant, self.config.flip, 1):
            raise ValueError(f"bs {batch_size} is larger than the slots this worker made (slot_boxes)")
        new = replace(self.config, model_path=model_path, batch_size=batch_size, dump_dir=dump_dir, model=model)
        self.on_device(partial(self._rebatch, new)).result()

    def _rebatch(self, new: WorkerConfig) -> None:
        """On the device thread."""
        if new.model_path != self.config.model_path or self.session is None:
            self.reopen(new)
            return
        if new.batch_size != self.config.batch_size:
            self.session.batch_size = new.batch_size
            warm_up(self.session, new.flip)
        self.config = new

    def run_shard(self, shard: Shard) -> ShardResult:
        done: Future = Future()
        self.on_device(partial(self._begin, shard, done))
        result, dumps = done.result()
        if self.config.dump_dir and dumps:
            _save_npz(Path(self.config.dump_dir) / f"shard-{shard.id:06d}.npz",
                      box_ids=result.box_ids, heatmaps=np.concatenate(dumps))
        return result

    def _begin(self, shard: Shard, done: Future) -> None:
        """On the device thread: the shard's chunks (``chunk_boxes``: one or more device batches) queue for slots."""
        chunk = chunk_boxes(self.config.batch_size)
        result = ShardResult(shard.id, self.config.place.label, np.zeros(0, np.int64),
                             np.zeros((0, 17, 3), np.float32), np.zeros((0, 4), np.float32), started=time.time())
        starts = range(0, len(shard.boxes), chunk)
        run = _ShardRun(shard, done, self.host.least_busy(), [None] * len(starts), len(starts), result)
        self.begin(done)
        if not starts:
            self.end(done, (result, []))
        for k, i in enumerate(starts):
            self._slots.when_free(partial(self._prepare, run, k, shard.boxes[i:i + chunk]))

    def _prepare(self, run: _ShardRun, k: int, boxes: list[Box], slot: int, waited: float) -> None:
        """On the device thread, with a free ``slot``: have the shard's host process prepare chunk ``k`` there."""
        run.stages["slot_wait"] += waited
        ids, shipped = {b.image_id for b in boxes}, run.shard.image_bytes
        data = {i: shipped[i] for i in ids if i in shipped} if shipped else None
        self.prepare_in(run.done, slot, lambda: run.host.submit(
            prepare_into, slot, boxes, {i: run.shard.image_paths[i] for i in ids}, self.config.variant,
            self.config.flip, data), partial(self._device_step, run, k, slot))

    def _device_step(self, run: _ShardRun, k: int, slot: int, prep: Future) -> None:
        """On the device thread: chunk ``k``'s backend calls on its inputs in ``slot``, the outputs written
        beside them for a host process to decode; the slot is freed when that is done."""
        try:
            if run.done.done():
                raise ShardDropped
            prepared: PreparedInputs = prep.result()
            ran = RanBatch(prepared, self.take_idle())
            if not prepared.inputs:  # no usable box
                self._slots.release(slot)
                self._batch_back(run, k, ran, None)
                return
            if self.session is None:
                raise RuntimeError(f"{self.config.place.label}: no open session: the last set_batch failed to "
                                   "open its model")
            specs = self._calls(ran, self._slots.views(prepared.inputs), self._slots.writer(slot, prepared.inputs))
            post = self.host.least_busy().submit(decode_from, specs, prepared.crop_boxes, bool(self.config.dump_dir))
        except BaseException as e:
            self._slots.release(slot)
            self.fail(run.done, e)
            return
        post.add_done_callback(self.then(run.done, partial(self._decoded, run, k, slot, ran)))

    def _decoded(self, run: _ShardRun, k: int, slot: int, ran: RanBatch, post: Future) -> None:
        """On the device thread: chunk ``k`` is decoded; its slot goes to the next chunk waiting."""
        self._slots.release(slot)
        self._batch_back(run, k, ran, post.result())

    def _batch_back(self, run: _ShardRun, k: int, ran: RanBatch, decoded: DecodedBatch | None) -> None:
        run.back[k] = (ran, decoded)
        run.left -= 1
        if run.left == 0:
            parts = _ShardParts()
            for ran, decoded in run.back:
                parts.add(run.result, ran, decoded, run.stages)
            parts.finish(run.result, run.stages)
            run.result.finished = time.time()
            self.end(run.done, (run.result, parts.dumps))

    def _calls(self, ran: RanBatch, inputs: list[np.ndarray], writer: SlotWriter) -> list[ArraySpec]:
        """One run_network per device batch of the chunk and input array (a batch's passes one after the other),
        its outputs written by the backend into the slot beside the inputs (``writer``), so each call's own
        device seconds (and start) are kept; where the outputs lie."""
        bs = self.config.batch_size
        outs = [writer.empty(output_shape(len(x)), np.float32) for x in inputs]
        t0 = time.perf_counter()
        for i in range(0, len(inputs[0]), bs):
            for x, out in zip(inputs, outs):
                ran.starts.append(time.time())
                _, seconds = run_network(self.session, [x[i:i + bs]], [out[i:i + bs]])
                ran.calls.append(seconds)
        ran.busy = time.perf_counter() - t0
        n = len(inputs[0])
        ran.crops = 2 * n if self.config.variant.fused_flip else n * len(inputs)
        ran.bytes_to_device = sum(x.nbytes for x in inputs)
        ran.bytes_from_device = sum(spec.nbytes for spec in writer.specs)
        return writer.specs


@dataclass
class _ShardParts:
    """A shard's chunks as they come back, in order, until they are one ``ShardResult``."""

    ids: list = field(default_factory=list)
    keypoints: list = field(default_factory=list)
    crop_boxes: list = field(default_factory=list)
    dumps: list = field(default_factory=list)
    calls: list = field(default_factory=list)
    starts: list = field(default_factory=list)

    def add(self, result: ShardResult, ran: RanBatch, decoded: DecodedBatch | None, stages: dict) -> None:
        for stage, s in ran.prepared.seconds.items():
            stages[stage] += s
        stages["prep_wait"] += ran.prep_wait
        result.skipped += ran.prepared.skipped
        if decoded is None:
            return
        for stage, s in decoded.seconds.items():
            stages[stage] += s
        self.calls += ran.calls
        self.starts += ran.starts
        result.busy_seconds += ran.busy
        result.device_seconds += sum(ran.calls)
        result.crops += ran.crops
        result.calls += len(ran.calls)
        result.bytes_to_device += ran.bytes_to_device
        result.bytes_from_device += ran.bytes_from_device
        self.ids.append(ran.prepared.box_ids)
        self.keypoints.append(decoded.keypoints)
        self.crop_boxes.append(ran.prepared.crop_boxes)
        if decoded.heatmaps is not None:
            self.dumps.append(decoded.heatmaps)

    def finish(self, result: ShardResult, stages: dict) -> None:
        if self.ids:
            result.box_ids, result.keypoints = np.concatenate(self.ids), np.concatenate(self.keypoints)
            result.crop_boxes = np.concatenate(self.crop_boxes)
        result.call_seconds = np.asarray(self.calls, np.float32)
        result.call_starts = np.asarray(self.starts, np.float64)
        result.host_seconds = stages


def first_missing(sample: tuple[tuple[str, int], ...]) -> str | None:
    """The first sampled image this node does not hold as the driver does (absent, or another size); None: all."""
    return next((path for path, size in sample if file_size(path) != size), None)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_file(path, "wb") as f:
        np.savez(f, **arrays)
