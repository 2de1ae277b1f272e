"""Host work in processes (cluster.host_work): shared slots, a host process that dies, and GIL-holding devices.

aclruntime keeps the GIL for a whole device call; the sim backend (``gil='hold'``) and
the fake aclruntime (``FAKE_ACL_RATE`` / ``FAKE_ACL_EXEC_MS``) do the same, so these
tests show what a real NPU does to the worker's own threads.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
import threading
import time

import numpy as np
import pytest

from cluster.actor import Shard, Worker, WorkerConfig
from cluster.host_work import BatchSlots, HostProcessDied, slot_room
from cluster.worker import WorkerPlace
from tasks.backends.sim import SimBackend
from tasks.dataset import load_boxes
from tasks.variant import Variant

FAKES = Path(__file__).resolve().parent / "fakes"


def spins_during(call, seconds: float) -> float:
    """How far a Python thread got while ``call()`` ran, against the same time with the GIL free."""
    count, stop = [0], [False]

    def spin() -> None:
        while not stop[0]:
            count[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.05)
        c0 = count[0]
        t0 = time.perf_counter()
        call()
        during = (count[0] - c0) / (time.perf_counter() - t0)
        c1 = count[0]
        time.sleep(seconds)
        free = (count[0] - c1) / seconds
    finally:
        stop[0] = True
        t.join()
    return during / free


def test_a_sim_device_that_holds_the_gil_stops_the_other_threads_and_one_that_releases_does_not():
    held = SimBackend(100.0, 8, gil="hold")  # 8 crops: 80 ms a call
    freed = SimBackend(100.0, 8, gil="release")
    x = np.zeros((8, 3, 256, 192), np.float32)
    # between two held calls the spinning thread gets its switch interval; inside them nothing
    assert spins_during(lambda: [held.run(x[:8]) for _ in range(3)], 0.2) < 0.2
    assert spins_during(lambda: [freed.run(x[:8]) for _ in range(3)], 0.2) > 0.5
    with pytest.raises(ValueError, match="--sim-gil 'keep': use one of hold, release"):
        SimBackend(100.0, 8, gil="keep")


def test_the_fake_aclruntimes_device_wait_holds_the_gil(monkeypatch):
    """The wait ``run`` makes for FAKE_ACL_EXEC_MS / FAKE_ACL_RATE (tests/fakes/aclruntime.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fake_aclruntime", FAKES / "aclruntime.py")
    aclruntime = importlib.util.module_from_spec(spec)
    monkeypatch.setenv("FAKE_AIS_BENCH_API", "new")
    spec.loader.exec_module(aclruntime)
    assert spins_during(lambda: [aclruntime._hold_gil(0.08) for _ in range(3)], 0.2) < 0.2


def test_slots_hold_arrays_in_place_and_refuse_what_does_not_fit():
    slots = BatchSlots(2, slot_room([4 * 3 * 8, 4 * 5]))
    try:
        a = np.arange(24, dtype=np.float32).reshape(3, 8)
        (spec_a,) = slots.put(1, [a])
        writer = slots.writer(1, after=[spec_a])
        b = writer.empty((5,), np.float32)
        b[:] = 7
        assert np.array_equal(slots.view(spec_a), a) and np.array_equal(slots.views(writer.specs)[0], np.full(5, 7))
        assert spec_a.offset >= slots.slot_bytes and writer.specs[0].offset % 64 == 0
        with pytest.raises(ValueError, match="slot 0 holds"):
            slots.put(0, [np.zeros(1000, np.float32)])
        got = []
        slots.when_free(lambda slot, waited: got.append(slot))
        slots.when_free(lambda slot, waited: got.append(slot))
        slots.when_free(lambda slot, waited: got.append(slot))  # none free: it waits for a release
        assert sorted(got) == [0, 1]
        slots.release(got[0])
        assert got[2] == got[0]
    finally:
        slots.unlink()
    assert not os.path.exists(slots.path)


@pytest.fixture
def sim_worker():
    place = WorkerPlace(backend="sim", compute_device="cpu", label="sim:0", kind="cpu", threads=1)
    worker = Worker(WorkerConfig(place=place, model_path="", batch_size=4, host_processes=2, sim_rate=400.0,
                                 variant=Variant(uint8_input=True)))
    yield worker
    worker.close()


def test_a_worker_keeps_no_slot_file_and_runs_its_host_work_in_other_processes(sim_worker, synthetic_coco):
    box_set = load_boxes(synthetic_coco["dataroot"], synthetic_coco["dets"])
    described = sim_worker.describe()
    assert len(described["host_processes"]) == 2 and os.getpid() not in described["host_processes"]
    assert not os.path.exists(sim_worker._slots.path)  # mapped by all, then unlinked
    result = sim_worker.run_shard(Shard(0, box_set.boxes[:10], box_set.image_paths))
    assert sorted(result.box_ids) == sorted(b.id for b in box_set.boxes[:10])
    assert result.calls == 6 and result.crops == 20  # 3 batches (4, 4, 2), two passes each
    assert result.host_seconds["read_decode"] > 0 and result.host_seconds["decode_keypoints"] > 0


def test_the_device_thread_is_the_only_thread_the_worker_adds():
    """Nothing else in the worker's process asks for the GIL while a device call holds it: the host
    processes' answers, the slots and the next batches are all the device thread's."""
    before = set(threading.enumerate())
    place = WorkerPlace(backend="sim", compute_device="cpu", label="sim:0", kind="cpu", threads=1)
    worker = Worker(WorkerConfig(place=place, model_path="", batch_size=4, host_processes=2, sim_rate=400.0))
    try:
        assert [t.name for t in set(threading.enumerate()) - before] == ["device"]
    finally:
        worker.close()
    assert set(threading.enumerate()) <= before


def test_a_host_process_that_dies_is_a_worker_fault_with_one_line_not_a_hang(sim_worker, synthetic_coco):
    box_set = load_boxes(synthetic_coco["dataroot"], synthetic_coco["dets"])
    pid = sim_worker.describe()["host_processes"][0]
    os.kill(pid, signal.SIGKILL)
    errors = []
    t = threading.Thread(target=lambda: _run_all(sim_worker, box_set, errors))
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "run_shard hung after a host process died"
    assert errors and isinstance(errors[0], HostProcessDied)
    line = str(errors[0])
    assert "\n" not in line and f"pid {pid}" in line and "killed by signal 9" in line


def _run_all(worker: Worker, box_set, errors: list) -> None:
    try:
        for k in range(4):  # the shards go to the least busy process: sooner or later the dead one
            worker.run_shard(Shard(k, box_set.boxes[k * 8:(k + 1) * 8], box_set.image_paths))
    except HostProcessDied as e:
        errors.append(e)



class _PeakPerCrop:
    """A backend whose heatmap of each crop peaks where that crop's pixels say, whatever its batch; it keeps
    the size of every call."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size, self.variant, self.sizes = batch_size, Variant(), []

    def run(self, x, out=None):
        assert 1 <= len(x) <= self.batch_size
        self.sizes.append(len(x))
        heatmaps = np.zeros((len(x), 17, 64, 48), np.float32)
        for i, crop in enumerate(x):
            at = int(abs(float(crop.astype(np.float64).sum())) * 1000) % (64 * 48)
            heatmaps[i, :, at // 48, at % 48] = 1.0
        if out is not None:
            out[...] = heatmaps
        return heatmaps, 0.0

    def close(self) -> None:
        pass


def test_chunks_hold_whole_batches_of_at_least_16_boxes():
    from cluster.actor import chunk_boxes
    assert [chunk_boxes(bs) for bs in (1, 4, 5, 7, 16, 24, 64)] == [16, 16, 20, 21, 16, 24, 64]


def test_a_chunk_runs_its_batches_one_by_one_and_keypoints_do_not_depend_on_the_batch_size(
        synthetic_coco, monkeypatch):
    """Below 16 boxes a batch, a host request holds several batches; the device still sees each batch alone."""
    backends = []

    def open_session(self, config):
        backends.append(_PeakPerCrop(config.batch_size))
        return backends[-1]

    monkeypatch.setattr(Worker, "open_session", open_session)
    monkeypatch.setattr("cluster.actor.warm_up", lambda backend, flip: None)
    box_set = load_boxes(synthetic_coco["dataroot"], synthetic_coco["dets"])
    boxes = box_set.boxes[:37]
    keypoints = []
    for bs in (1, 3, 16):
        place = WorkerPlace(backend="sim", compute_device="cpu", label="sim:0", kind="cpu", threads=1)
        worker = Worker(WorkerConfig(place=place, model_path="", batch_size=bs, host_processes=1))
        try:
            result = worker.run_shard(Shard(0, boxes, box_set.image_paths))
        finally:
            worker.close()
        batches = [min(bs, len(boxes) - i) for i in range(0, len(boxes), bs)]
        assert backends[-1].sizes == [n for n in batches for _ in range(2)]  # each batch's two passes, in order
        assert result.calls == 2 * len(batches) and list(result.box_ids) == [b.id for b in boxes]
        keypoints.append(result.keypoints)
    assert len({k.tobytes() for k in keypoints}) == 1 and np.ptp(keypoints[0][..., :2]) > 10
