"""The shard queue: its rules on their own (cluster.queue, no Ray), Ray's errors classified, and the
Ray loop (cluster.dispatch.run_shards) with small real actors that sleep, hang or raise: hung and slow
workers, every worker lost, the stop event, a driver-side bug.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass

import pytest

ray = pytest.importorskip("ray")
import ray.exceptions as rex  # noqa: E402

from cluster.dispatch import classify, run_shards  # noqa: E402
from cluster.errors import AllDevicesLost, Stopped  # noqa: E402
from cluster.queue import DispatchPolicy, ShardQueue, device_timeout  # noqa: E402
from cluster.errors import WorkerBroken  # noqa: E402
from cluster.pool import ActorPool  # noqa: E402
from cluster.session import Session  # noqa: E402
from ray_support import private_ray  # noqa: E402


@dataclass
class FakeShard:
    id: int


@dataclass
class Done:
    shard_id: int
    device: str = ""
    ran_on: str = ""


# ---------------------------------------------------------------- the queue's rules, no Ray


class Queue:
    """A ShardQueue whose sends are recorded; the test plays Ray: it says how each token ended."""

    def __init__(self, workers=("a", "b"), shards=6, **policy) -> None:
        self.sent, self.lines, self.now = [], [], 0.0
        self.queue = ShardQueue([FakeShard(k) for k in range(shards)], list(workers),
                                DispatchPolicy(**policy), self._send, self.lines.append)

    def _send(self, worker, shard):
        self.sent.append((worker, shard.id))
        return len(self.sent) - 1  # the token: the send's index

    def drive(self, outcome, limit=200):
        """Fill, then settle the oldest token as ``outcome(worker, shard_id, n)`` says ('ok' or a failure
        kind), ``n`` counting earlier sends of that shard, until done. The results: [(shard id, worker)]."""
        results, dropped, given_up = [], [], []
        for _ in range(limit):
            if self.queue.done:
                return results, dropped, given_up
            self.queue.fill(self.now)
            token = self.queue.tokens[0]
            worker, shard_id = self.sent[token]
            n = [s for _, s in self.sent[:token]].count(shard_id)
            kind = outcome(worker, shard_id, n)
            self.now += 1.0
            if kind == "ok":
                sent, unwanted = self.queue.succeeded(token, self.now)
                results.append((sent.shard.id, sent.worker))
            else:
                failure = self.queue.failed(token, kind, f"{kind} on {worker}", self.now)
                dropped += failure.dropped
                if failure.given_up:
                    given_up.append((failure.given_up[0].id, failure.given_up[1]))
        raise AssertionError("the queue never finished")


def ok(worker, shard_id, n):
    return "ok"


def drive_reads(q: Queue, unreadable_on: set[str], avoid=lambda worker: set()):
    """Like ``Queue.drive``, where every shard comes back incomplete from the workers in ``unreadable_on``
    (images their node cannot read) and the queue is asked to run it elsewhere."""
    results = []
    for _ in range(200):
        if q.queue.done:
            return results
        q.queue.fill(q.now)
        token = q.queue.tokens[0]
        worker, shard_id = q.sent[token]
        q.now += 1.0
        if worker in unreadable_on and q.queue.rejected(token, f"unread on {worker}", avoid(worker), q.now):
            continue
        sent, _ = q.queue.succeeded(token, q.now)
        results.append((sent.shard.id, sent.worker, worker in unreadable_on))
        q.dropped = getattr(q, "dropped", []) + q.queue.drops()
    raise AssertionError("the queue never finished")


def test_a_shard_a_worker_could_not_read_runs_on_another_and_that_worker_is_dropped_after_two():
    q = Queue(workers=("a", "b", "c"), shards=6)
    results = drive_reads(q, {"b"})
    assert sorted(s for s, _, _ in results) == list(range(6))
    assert all(w != "b" and not incomplete for _, w, incomplete in results)  # nothing left out, none won by b
    assert q.dropped == ["b"] and "2 shards whose images other devices read could not be read on it " \
        "(last: unread on b)" in q.queue.report.lost["b"]
    assert any(line.startswith("shard 1 on b: unread on b; it runs again on another device") for line in q.lines)


def test_the_workers_to_avoid_are_skipped_and_with_no_other_worker_the_result_stands():
    # a and b share a node: a shard b could not read goes to c, never to a
    q = Queue(workers=("a", "b", "c"), shards=3)
    results = drive_reads(q, {"b"}, avoid=lambda w: {"a", "b"})
    assert [w for w, s in q.sent if s == 1] == ["b", "c"]
    # one worker only: its incomplete result is taken as it is (its boxes are skipped, named)
    q = Queue(workers=("a",), shards=2)
    results = drive_reads(q, {"a"})
    assert results == [(0, "a", True), (1, "a", True)] and not q.queue.report.lost


def test_first_fill_gives_every_worker_one_shard_before_any_gets_two():
    q = Queue(workers=("a", "b", "c"), shards=7)
    q.queue.fill(0.0)
    assert q.sent == [("a", 0), ("b", 1), ("c", 2), ("a", 3), ("b", 4), ("c", 5)]  # two in flight each
    results, _, _ = q.drive(ok)
    assert sorted(s for s, _ in results) == list(range(7)) and q.sent[6] == ("a", 6)


def test_a_poisonous_shard_is_retried_elsewhere_then_given_up_and_no_worker_is_dropped():
    q = Queue(shards=6)
    results, dropped, given_up = q.drive(lambda w, s, n: "task" if s == 2 else "ok")
    assert sorted(s for s, _ in results) == [0, 1, 3, 4, 5]
    assert [w for w, s in q.sent if s == 2] == ["a", "b", "a"]  # another worker each retry, while there is one
    assert given_up == [(2, "task on a")] and q.queue.report.failed[0][0].id == 2
    assert dropped == [] and not q.queue.report.lost and q.queue.workers == ["a", "b"]
    assert "shard 2 failed 3 times, last on a (task on a); its boxes are skipped" in q.lines


def test_a_worker_that_fails_every_shard_is_dropped_as_a_broken_device():
    q = Queue(shards=8)
    results, dropped, given_up = q.drive(lambda w, s, n: "task" if w == "b" else "ok")
    assert sorted(s for s, _ in results) == list(range(8)) and not given_up
    assert dropped == ["b"] and "3 shards in a row failed on it" in q.queue.report.lost["b"]
    assert {w for _, w in results} == {"a"}


def test_a_lost_result_runs_again_and_keeps_the_worker():
    q = Queue(shards=4)
    results, dropped, given_up = q.drive(lambda w, s, n: "result" if s == 1 and n == 0 else "ok")
    assert sorted(s for s, _ in results) == [0, 1, 2, 3] and not given_up and not dropped
    assert [s for _, s in q.sent].count(1) == 2
    assert any(line.startswith("shard 1: its result was lost on b (") for line in q.lines)


def test_a_lost_device_loses_its_worker_and_its_shards_run_elsewhere():
    q = Queue(shards=4)
    results, dropped, given_up = q.drive(lambda w, s, n: "device" if w == "b" else "ok")
    assert sorted(s for s, _ in results) == [0, 1, 2, 3] and not given_up
    assert dropped == ["b"] and {w for _, w in results} == {"a"}
    assert any(line.startswith("device b lost (device on b)") for line in q.lines)


def test_out_of_memory_loses_the_worker_and_counts_against_the_shard():
    q = Queue(workers=("a", "b", "c", "d"), shards=4)
    results, dropped, given_up = q.drive(lambda w, s, n: "memory" if s == 0 else "ok")
    # Shard 0 killed three workers, then was given up: the fourth is kept for the rest.
    assert [w for w, s in q.sent if s == 0] == ["a", "b", "c"]
    assert len(given_up) == 1 and given_up[0][0] == 0 and "out of memory" in given_up[0][1]
    assert sorted(dropped) == ["a", "b", "c"] and sorted(s for s, _ in results) == [1, 2, 3]


def test_every_worker_lost_leaves_no_token_and_names_each_cause():
    q = Queue(shards=3)
    q.queue.fill(0.0)  # a: 0, 2; b: 1
    assert q.queue.failed(0, "device", "gone", 1.0).dropped == ["a"]
    assert q.queue.tokens == [1]  # a's second shard went back with it
    assert q.queue.failed(1, "device", "gone", 1.0).dropped == ["b"]
    q.queue.fill(1.0)
    assert not q.queue.done and q.queue.tokens == []
    assert q.queue.all_lost() == "every device was lost (a: gone; b: gone)"


def test_an_unknown_failure_kind_is_the_callers_bug():
    q = Queue(shards=1)
    q.queue.fill(0.0)
    with pytest.raises(ValueError, match="unknown failure kind 'oops'"):
        q.queue.failed(q.queue.tokens[0], "oops", "?", 1.0)


def test_a_silent_worker_is_dropped_after_the_device_timeout_and_its_shards_go_back():
    q = Queue(shards=4, device_timeout_s=5)
    q.queue.fill(0.0)
    assert q.queue.hung(4.0) == []
    sent, _ = q.queue.succeeded(q.queue.tokens[0], 4.0)  # a's first shard: a answered
    assert sent.worker == "a" and q.queue.hung(5.5) == ["b"]
    assert q.queue.report.lost["b"] == "no result for 6 s while holding 2 shards (device timeout 5 s)"
    q.now = 5.5
    results, _, _ = q.drive(ok)
    assert sorted(s for s, _ in results) == [1, 2, 3] and {w for w, _ in q.sent[4:]} == {"a"}


def test_a_late_shard_is_copied_once_to_an_idle_worker_and_the_first_result_wins():
    q = Queue(shards=3, straggler_factor=3, straggler_floor_s=1)
    q.queue.fill(0.0)  # a: 0, 2; b: 1
    for token in (0, 2):  # a finishes both in 1 s each
        q.queue.succeeded(token, 1.0)
    q.queue.copy_late(3.5)  # b's shard 1 is 3.5 s old, past max(1, 3 x 1 s)
    assert q.sent[-1] == ("a", 1) and q.queue.report.copies == 1
    q.queue.copy_late(9.0)
    assert len(q.sent) == 4  # a shard is copied once
    sent, unwanted = q.queue.succeeded(3, 4.0)  # the copy wins; the original is unwanted
    assert sent.copy and sent.worker == "a" and unwanted == [1] and q.queue.done
    assert q.queue.report.copies_won == Counter({"a": 1}) and q.queue.unwanted() == []


def test_the_queue_notes_the_timelines_events_and_the_run_a_copy_beat(monkeypatch):
    """Unix-timed events (queue empty, copy sent, device lost), the copy that won, and the
    original it beat as a cancelled run from its send to its cancel: the timeline's markers
    and its ``won: false`` span."""
    clock = iter(float(t) for t in range(1000, 1100))
    monkeypatch.setattr("cluster.queue.time.time", lambda: next(clock))
    q = Queue(workers=("a", "b", "c"), shards=4, straggler_factor=3, straggler_floor_s=1)
    q.queue.fill(0.0)  # unix 1000-1003: a 0, b 1, c 2, a 3; then the queue is empty (1004)
    for token in (0, 2, 3):  # a and c finish in 1 s each
        q.queue.succeeded(token, 1.0)
    q.queue.copy_late(3.5)  # b's shard 1 to the idle a: noted at 1005, sent at 1006
    assert q.queue.lose("c", "node died") == ["c"]  # 1007
    sent, unwanted = q.queue.succeeded(4, 4.0)  # the copy wins; b's original is cancelled at 1008
    report = q.queue.report
    assert [(e.time, e.kind, e.worker, e.shard) for e in report.events] == [
        (1004.0, "queue_empty", None, None), (1005.0, "copy_sent", "a", 1), (1007.0, "device_lost", "c", None)]
    assert report.events[1].text.endswith("a copy runs on a") and report.events[2].text == "c lost: node died"
    assert sent.copy and unwanted == [1] and report.won_by_copy == {(1, "a")}
    assert [(c.shard, c.worker, c.sent, c.cancelled, c.copy) for c in report.cancelled] == [
        (1, "b", 1001.0, 1008.0, False)]


def test_the_automatic_device_timeout():
    assert device_timeout(DispatchPolicy(), []) == 300.0
    assert device_timeout(DispatchPolicy(), [40.0, 50.0, 60.0]) == 500.0  # sorted, as the queue keeps them
    assert device_timeout(DispatchPolicy(), [40.0, 50.0, 60.0, 70.0]) == 550.0
    assert device_timeout(DispatchPolicy(device_timeout_s=7), [50.0]) == 7
    assert device_timeout(DispatchPolicy(device_timeout_s=0), [50.0]) is None


# ---------------------------------------------------------------- Ray's errors, classified


def task_error(message: str) -> rex.RayTaskError:
    return rex.RayTaskError("run_shard", "Traceback ...", ValueError(message))


@pytest.mark.parametrize("error, kind", [
    (rex.ObjectLostError("ab" * 14, None, ""), "result"),
    (rex.OwnerDiedError("ab" * 14, None, ""), "result"),
    (rex.ObjectStoreFullError("object store is full"), "result"),
    (rex.OutOfMemoryError("Task was killed due to the node running low on memory"), "memory"),
    (rex.NodeDiedError("the node died"), "device"),
    (rex.ActorDiedError(), "device"),
    (rex.WorkerCrashedError(), "device"),
    (task_error("boom"), "task"),
    (rex.RayTaskError("run_shard", "Traceback ...", WorkerBroken("host process host-0 (pid 7) ended")), "device"),
])
def test_each_ray_error_is_classified(error, kind):
    assert classify(error) == kind


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
    with private_ray(sys.modules[__name__]):
        yield


def real_pool(plan: dict) -> ActorPool:
    pool = ActorPool(Session(ray, [], 1.0, existing=True), SleepyWorker, "sim", 1)
    remote = ray.remote(max_concurrency=2, max_restarts=0, num_cpus=0)(SleepyWorker)
    pool.actors = {label: remote.remote(label, plan) for label in ("a", "b")}
    return pool


def test_a_worker_that_stops_answering_is_declared_lost_and_its_shards_run_elsewhere(local_ray):
    pool = real_pool({"b": {"default": 3600}})
    results, lines = [], []
    started = time.monotonic()
    report = run_shards(pool, [FakeShard(k) for k in range(6)], results.append, lines.append,
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
    report = run_shards(pool, [FakeShard(k) for k in range(6)], results.append, lines.append,
                      DispatchPolicy(device_timeout_s=0, straggler_factor=3, straggler_floor_s=0.5, poll_s=0.05))
    assert time.monotonic() - started < 6  # the copy, not the 8 s original, finished the run
    assert sorted(r.shard_id for r in results) == list(range(6))  # each once
    late = [r for r in results if r.shard_id == 1]
    assert late[0].ran_on == "a" and late[0].device == "a"
    assert report.copies == 1 and report.copies_won == Counter({"a": 1}) and not report.lost
    assert any(line.startswith("shard 1 on b for ") and line.endswith("a copy runs on a") for line in lines)


class DyingWorker:
    """Its process exits on its first shard: Ray reports the actor dead."""

    def run_shard(self, shard) -> Done:
        import os

        os._exit(1)


def test_every_worker_lost_raises_with_each_cause(local_ray):
    pool = ActorPool(Session(ray, [], 1.0, existing=True), DyingWorker, "sim", 1)
    remote = ray.remote(max_concurrency=2, max_restarts=0, num_cpus=0)(DyingWorker)
    pool.actors = {label: remote.remote() for label in ("a", "b")}
    with pytest.raises(AllDevicesLost, match=r"^every device was lost \([ab]: .*; [ab]: .*\)$") as raised:
        run_shards(pool, [FakeShard(k) for k in range(3)], print, print, DispatchPolicy(poll_s=0.05))
    assert sorted(pool.lost) == ["a", "b"]  # in the order Ray saw them die
    assert "a: " in str(raised.value) and "b: " in str(raised.value)


def test_stop_ends_the_dispatch_between_two_calls(local_ray):
    import threading

    stop = threading.Event()
    results = []

    def on_result(r):
        results.append(r)
        stop.set()  # as the Ctrl-C handler does

    with pytest.raises(Stopped):
        run_shards(real_pool({}), [FakeShard(k) for k in range(6)], on_result, print, DispatchPolicy(poll_s=0.05),
                   stop=stop)
    assert len(results) == 1


def test_an_error_of_the_drivers_own_code_stops_the_run_and_kills_no_worker(local_ray):
    pool = real_pool({})

    def on_result(r):
        raise KeyError("a bug in the driver")

    with pytest.raises(KeyError, match="a bug in the driver"):
        run_shards(pool, [FakeShard(k) for k in range(4)], on_result, print, DispatchPolicy(poll_s=0.05))
    assert sorted(pool.actors) == ["a", "b"] and not pool.lost and not pool.killed


class Closing:
    """A worker whose close() returns at once, or hangs when told to."""

    def __init__(self, hang: bool) -> None:
        self.hang = hang

    def close(self) -> None:
        time.sleep(3600 if self.hang else 0)


def test_close_lets_workers_that_answer_exit_and_kills_only_the_hung_one(local_ray):
    lines = []
    pool = ActorPool(Session(ray, [], 1.0, existing=True), Closing, "sim", 1, log=lines.append)
    remote = ray.remote(max_concurrency=2, max_restarts=0, num_cpus=0)(Closing)
    pool.actors = {"a": remote.remote(False), "b": remote.remote(True)}
    handles = dict(pool.actors)
    started = time.monotonic()
    pool.close(timeout_s=2.0)
    assert time.monotonic() - started < 15 and pool.killed == ["b"] and not pool.actors
    assert lines == ["device b: its session did not close within 2 s; killed"]
    for handle in handles.values():  # both are gone: a by its own exit, b killed
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(handle.close.remote(), timeout=30)
