"""The shard queue (cluster.dispatch) on its own: fill order, retries, lost results, hung and slow workers.

Two kinds of workers: a fake Ray (plain Python, one outcome planned per call) for the
error handling, whose exceptions Ray raises at the driver and which no real worker can
be made to produce on cue; and small real Ray actors that sleep, hang or raise, for
what depends on time (hung and slow workers).
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass

import pytest

ray = pytest.importorskip("ray")
import ray.exceptions as rex  # noqa: E402

from cluster.dispatch import DispatchPolicy, classify, device_timeout, dispatch  # noqa: E402
from cluster.errors import AllDevicesLost, Stopped  # noqa: E402
from cluster.pool import ActorPool  # noqa: E402
from cluster.session import Session  # noqa: E402


@dataclass
class FakeShard:
    id: int


@dataclass
class Done:
    shard_id: int
    device: str = ""
    ran_on: str = ""


# ---------------------------------------------------------------- a fake Ray: errors on cue


class FakeRef:
    def __init__(self, label: str, shard, outcome) -> None:
        self.label, self.shard, self.outcome = label, shard, outcome


class FakeRay:
    """Ray's wait/get/kill/cancel for actors whose every call ends as ``plan(label, shard, n)`` says:
    a ``Done`` or an exception instance (``n``: how many times that shard was sent before)."""

    def __init__(self, plan) -> None:
        self.plan, self.sent, self.killed = plan, [], []

    def actor(self, label: str):
        fake = self

        class Method:
            @staticmethod
            def remote(shard):
                n = sum(1 for s in fake.sent if s[1] == shard.id)
                fake.sent.append((label, shard.id))
                return FakeRef(label, shard, fake.plan(label, shard, n))

        return type("Handle", (), {"run_shard": Method, "label": label})()

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        if isinstance(ref.outcome, BaseException):
            raise ref.outcome
        return ref.outcome

    def kill(self, handle, no_restart=True):
        self.killed.append(handle.label)

    def cancel(self, ref):
        pass


def fake_pool(fake: FakeRay, labels: list[str]) -> ActorPool:
    pool = ActorPool(Session(fake, [], 1.0, existing=True), object, "sim", 1)
    pool.actors = {label: fake.actor(label) for label in labels}
    return pool


def ok(label, shard, n):
    return Done(shard.id)


def task_error(message: str) -> rex.RayTaskError:
    return rex.RayTaskError("run_shard", "Traceback ...", ValueError(message))


def run_fake(plan, labels=("a", "b"), shards=6, **policy):
    fake = FakeRay(plan)
    pool = fake_pool(fake, list(labels))
    results, failed, lines = [], [], []
    report = dispatch(pool, [FakeShard(k) for k in range(shards)], results.append, lines.append,
                      DispatchPolicy(poll_s=0.01, **policy), lambda s, why: failed.append((s.id, why)))
    return fake, pool, report, results, failed, lines


def test_first_fill_gives_every_worker_one_shard_before_any_gets_two():
    fake, _, _, results, _, _ = run_fake(ok, labels=("a", "b", "c"), shards=6)
    assert fake.sent[:3] == [("a", 0), ("b", 1), ("c", 2)]  # then a second each
    assert fake.sent[3:6] == [("a", 3), ("b", 4), ("c", 5)]
    assert sorted(r.shard_id for r in results) == list(range(6))


def test_a_poisonous_shard_is_retried_elsewhere_then_skipped_and_no_worker_is_killed():
    def plan(label, shard, n):
        return task_error("cannot decode this one") if shard.id == 2 else Done(shard.id)

    fake, pool, report, results, failed, lines = run_fake(plan, shards=6)
    assert sorted(r.shard_id for r in results) == [0, 1, 3, 4, 5]
    assert [label for label, s in fake.sent if s == 2] == ["a", "b", "a"]  # another worker each retry
    assert failed == [(2, "cannot decode this one")] and report.failed[0][0].id == 2
    assert fake.killed == [] and not report.lost and sorted(pool.actors) == ["a", "b"]
    assert "shard 2 failed 3 times, last on a (cannot decode this one); its boxes are skipped" in lines


def test_a_worker_that_fails_every_shard_is_dropped_as_a_broken_device():
    def plan(label, shard, n):
        return task_error("ACL error 507011") if label == "b" else Done(shard.id)

    fake, pool, report, results, failed, _ = run_fake(plan, shards=8)
    assert sorted(r.shard_id for r in results) == list(range(8)) and not failed
    assert list(report.lost) == ["b"] and "3 shards in a row failed on it" in report.lost["b"]
    assert fake.killed == ["b"] and {r.device for r in results} == {"a"}


@pytest.mark.parametrize("error, kind", [
    (rex.ObjectLostError("ab" * 14, None, ""), "result"),
    (rex.OwnerDiedError("ab" * 14, None, ""), "result"),
    (rex.ObjectStoreFullError("object store is full"), "result"),
    (rex.OutOfMemoryError("Task was killed due to the node running low on memory"), "memory"),
    (rex.NodeDiedError("the node died"), "device"),
    (rex.ActorDiedError(), "device"),
    (rex.WorkerCrashedError(), "device"),
    (task_error("boom"), "task"),
])
def test_each_ray_error_is_classified(error, kind):
    assert classify(error) == kind


@pytest.mark.parametrize("error", [rex.ObjectLostError("ab" * 14, None, ""),
                                   rex.ObjectStoreFullError("object store is full")])
def test_a_lost_result_runs_again_and_keeps_the_worker(error):
    def plan(label, shard, n):
        return error if shard.id == 1 and n == 0 else Done(shard.id)

    fake, pool, report, results, failed, lines = run_fake(plan, shards=4)
    assert sorted(r.shard_id for r in results) == [0, 1, 2, 3] and not failed
    assert [s for _, s in fake.sent].count(1) == 2 and not report.lost and not fake.killed
    assert any(line.startswith("shard 1: its result was lost on b (") for line in lines)


def test_a_node_that_died_loses_its_worker_and_its_shard_runs_elsewhere():
    def plan(label, shard, n):
        return rex.NodeDiedError("node 1a2b died") if label == "b" and n == 0 else Done(shard.id)

    fake, pool, report, results, failed, lines = run_fake(plan, shards=4)
    assert sorted(r.shard_id for r in results) == [0, 1, 2, 3] and not failed
    assert list(report.lost) == ["b"] and fake.killed == ["b"] and {r.device for r in results} == {"a"}
    assert any(line.startswith("device b lost (node 1a2b died)") for line in lines)


def test_out_of_memory_loses_the_worker_and_counts_against_the_shard():
    def plan(label, shard, n):
        return rex.OutOfMemoryError("killed: low memory") if shard.id == 0 else Done(shard.id)

    fake, pool, report, results, failed, _ = run_fake(plan, labels=("a", "b", "c", "d"), shards=4)
    # Shard 0 killed three workers, then was given up: the fourth is kept for the rest.
    assert [label for label, s in fake.sent if s == 0] == ["a", "b", "c"]
    assert len(failed) == 1 and failed[0][0] == 0 and "out of memory" in failed[0][1]
    assert sorted(report.lost) == ["a", "b", "c"] and sorted(r.shard_id for r in results) == [1, 2, 3]


def test_every_worker_lost_raises_with_each_cause():
    with pytest.raises(AllDevicesLost, match=r"^every device was lost \(a: .*; b: .*\)$"):
        run_fake(lambda label, shard, n: rex.ActorDiedError(), shards=3)


def test_stop_ends_the_dispatch_between_two_calls():
    import threading

    stop = threading.Event()
    results = []

    def on_result(r):
        results.append(r)
        stop.set()  # as the Ctrl-C handler does

    fake = FakeRay(ok)
    with pytest.raises(Stopped):
        dispatch(fake_pool(fake, ["a"]), [FakeShard(k) for k in range(5)], on_result, print,
                 DispatchPolicy(poll_s=0.01), stop=stop)
    assert [r.shard_id for r in results] == [0]


def test_the_automatic_device_timeout():
    assert device_timeout(DispatchPolicy(), []) == 300.0
    assert device_timeout(DispatchPolicy(), [40.0, 50.0, 60.0]) == 500.0  # sorted, as dispatch keeps them
    assert device_timeout(DispatchPolicy(), [40.0, 50.0, 60.0, 70.0]) == 550.0
    assert device_timeout(DispatchPolicy(device_timeout_s=7), [50.0]) == 7
    assert device_timeout(DispatchPolicy(device_timeout_s=0), [50.0]) is None


# ---------------------------------------------------------------- real actors: hung and slow


class SleepyWorker:
    """Sleeps ``plan[label][shard id]`` seconds (default ``plan[label]['default']``) per shard."""

    def __init__(self, label: str, plan: dict) -> None:
        self.label, self.plan = label, plan

    def run_shard(self, shard) -> Done:
        mine = self.plan.get(self.label, {})
        time.sleep(mine.get(shard.id, mine.get("default", 0.05)))
        return Done(shard.id, ran_on=self.label)


@pytest.fixture(scope="module")
def local_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's classes travel by value
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def real_pool(plan: dict) -> ActorPool:
    pool = ActorPool(Session(ray, [], 1.0, existing=True), SleepyWorker, "sim", 1)
    remote = ray.remote(max_concurrency=2, max_restarts=0, num_cpus=0)(SleepyWorker)
    pool.actors = {label: remote.remote(label, plan) for label in ("a", "b")}
    return pool


def test_a_worker_that_stops_answering_is_declared_lost_and_its_shards_run_elsewhere(local_ray):
    pool = real_pool({"b": {"default": 3600}})
    results, lines = [], []
    started = time.monotonic()
    report = dispatch(pool, [FakeShard(k) for k in range(6)], results.append, lines.append,
                      DispatchPolicy(device_timeout_s=1.5, straggler_factor=0, poll_s=0.05))
    assert time.monotonic() - started < 20
    assert sorted(r.shard_id for r in results) == list(range(6)) and {r.ran_on for r in results} == {"a"}
    assert list(report.lost) == ["b"] and "b" not in pool.actors
    assert report.lost["b"].startswith("no result for 2 s while holding 2 shards (device timeout 1.5 s)")
    assert [line for line in lines if line.startswith("device b lost (no result for 2 s")]


def test_a_late_shard_is_copied_to_the_idle_worker_and_the_first_result_wins(local_ray):
    pool = real_pool({"b": {1: 8.0}})  # b's first shard is late; the rest take 0.05 s
    results, lines = [], []
    started = time.monotonic()
    report = dispatch(pool, [FakeShard(k) for k in range(6)], results.append, lines.append,
                      DispatchPolicy(device_timeout_s=0, straggler_factor=3, straggler_floor_s=0.5, poll_s=0.05))
    assert time.monotonic() - started < 6  # the copy, not the 8 s original, finished the run
    assert sorted(r.shard_id for r in results) == list(range(6))  # each once
    late = [r for r in results if r.shard_id == 1]
    assert late[0].ran_on == "a" and late[0].device == "a"
    assert report.copies == 1 and report.copies_won == Counter({"a": 1}) and not report.lost
    assert any(line.startswith("shard 1 on b for ") and line.endswith("a copy runs on a") for line in lines)
