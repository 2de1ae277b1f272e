"""The shard queue: shards to workers until each is done once, whatever the workers do.

``dispatch`` keeps ``in_flight`` shards queued per worker, filled breadth first
(one each, then a second each), so every worker starts at once and faster ones
take more. It never waits for ever:

- a worker that returns nothing for the device timeout while holding shards is
  declared lost (killed; its shards go to the others);
- when the queue is empty and a worker is idle, a shard in flight for longer than
  ``straggler_factor`` x the median shard time (and ``straggler_floor_s``) runs on the
  idle worker too: the first result wins, the other copy is cancelled or dropped;
- a shard whose own code raises is retried on another worker, at most
  ``max_attempts`` times in all, then handed to ``on_failed``; the worker is kept,
  unless it failed that many different shards in a row (a broken device).

Each shard's result reaches ``on_result`` exactly once. Any actor with a
``run_shard(shard)`` whose result has a ``device`` field will do (the pose ``Worker``,
the detector's ``DetectWorker``); shards need an ``id``.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.errors import AllDevicesLost, Stopped, first_line
from cluster.pool import IN_FLIGHT_PER_ACTOR, ActorPool

#: The automatic device timeout: 10 x the median shard time, never under 5 minutes. A
#: healthy device's shards take about the same time (whole batches of the same size),
#: so 10x is far outside its spread; the floor covers the first shards, before any
#: time is known, and hosts whose shards are slow by nature (bs 64 on a CPU).
TIMEOUT_FACTOR = 10.0
TIMEOUT_FLOOR_S = 300.0


@dataclass(frozen=True)
class DispatchPolicy:
    in_flight: int = IN_FLIGHT_PER_ACTOR
    #: A copy only uses a worker that would otherwise idle at the run's tail; 3x the median
    #: is well past the normal spread of shard times (same batches; the host's noise is
    #: tens of percent), and the floor keeps short tails from being copied for nothing.
    straggler_factor: float = 3.0  # 0: no copies
    straggler_floor_s: float = 10.0
    device_timeout_s: float | None = None  # None: automatic (TIMEOUT_*); 0: never
    max_attempts: int = 3  # runs of one shard that raised, across workers, before it is given up
    poll_s: float = 0.2  # how often timeouts, copies and the stop event are looked at


@dataclass
class DispatchReport:
    lost: dict[str, str] = field(default_factory=dict)  # label -> why
    failed: list[tuple[object, str]] = field(default_factory=list)  # (shard, error) given up
    copies: int = 0  # speculative copies sent
    copies_won: Counter = field(default_factory=Counter)  # label -> copies it ran that came first


@dataclass
class _Task:
    shard: object
    label: str
    sent: float
    copy: bool


def device_timeout(policy: DispatchPolicy, shard_seconds: list[float]) -> float | None:
    """Seconds a worker holding shards may go without a result; None: no limit.

    ``shard_seconds``: the times of the shards done so far, sorted."""
    if policy.device_timeout_s == 0:
        return None
    if policy.device_timeout_s:
        return policy.device_timeout_s
    median = _median(shard_seconds) if shard_seconds else 0.0
    return max(TIMEOUT_FLOOR_S, TIMEOUT_FACTOR * median)


def _median(ordered: list[float]) -> float:
    """The median of an already sorted list, without sorting it again."""
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def classify(error: BaseException) -> str:
    """What a failed shard says: 'task' (its own code raised), 'result' (its result was
    lost on the way, the worker lives), 'memory' (the worker was killed for memory) or
    'device' (the worker or its node is gone)."""
    from ray.exceptions import ObjectLostError, ObjectStoreFullError, OutOfMemoryError, RayTaskError

    if isinstance(error, RayTaskError):
        return "task"
    if isinstance(error, (ObjectLostError, ObjectStoreFullError)):  # OwnerDiedError is an ObjectLostError
        return "result"
    if isinstance(error, OutOfMemoryError):
        return "memory"
    return "device"  # RayActorError, NodeDiedError, WorkerCrashedError and any other


def dispatch(pool: ActorPool, shards: deque, on_result: Callable, log: Callable,
             policy: DispatchPolicy = DispatchPolicy(), on_failed: Callable | None = None,
             stop: threading.Event | None = None) -> DispatchReport:
    """Run every shard once on the pool's workers; see the module's text.

    Raises ``AllDevicesLost`` when shards remain and no worker does, ``Stopped`` when
    ``stop`` is set. Results are labelled here with the device that computed them.
    """
    ray = pool.session.ray
    report = DispatchReport()
    pending = deque(shards)
    total = len(pending)
    tasks: dict[object, _Task] = {}
    held = Counter()  # label -> shards in flight
    waiting_since: dict[str, float] = {}  # label -> since when it holds shards and has returned nothing
    finished: set = set()  # shard ids with a result, or given up
    copied: set = set()
    attempts = Counter()  # shard id -> runs that raised
    avoid: dict[object, set[str]] = {}  # shard id -> workers it raised on
    failing_in_a_row = Counter()  # label -> distinct shards in a row that raised on it
    shard_seconds: list[float] = []  # kept sorted: its median is read every poll
    causes: list[str] = []

    def send(label: str, shard, copy: bool = False) -> None:
        now = time.monotonic()
        if not held[label]:
            waiting_since[label] = now
        tasks[pool.actors[label].run_shard.remote(shard)] = _Task(shard, label, now, copy)
        held[label] += 1

    def take(label: str):
        """The first queued shard for ``label``: one that raised on it waits for a worker
        that has not tried it, while there is one."""
        for k, shard in enumerate(pending):
            tried = avoid.get(shard.id, ())
            if label not in tried or all(x in tried for x in pool.actors):
                del pending[k]
                return shard
        return None

    def fill() -> None:
        for level in range(policy.in_flight):
            for label in list(pool.actors):
                if pending and held[label] <= level and (shard := take(label)) is not None:
                    send(label, shard)

    def in_flight(shard_id) -> list:
        return [ref for ref, t in tasks.items() if t.shard.id == shard_id]

    def forget(ref) -> _Task:
        task = tasks.pop(ref)
        held[task.label] -= 1
        return task

    def requeue(shard) -> None:
        if shard.id not in finished and not in_flight(shard.id):
            pending.appendleft(shard)

    def lose(label: str, why: str) -> None:
        if label not in pool.actors:
            return
        causes.append(f"{label}: {why}")
        report.lost[label] = why
        log(f"device {label} lost ({why}); its shards go to the other devices")
        pool.lose(label, why)
        for ref in [r for r, t in tasks.items() if t.label == label]:
            requeue(forget(ref).shard)

    def give_up_or_retry(task: _Task, why: str) -> None:
        shard = task.shard
        attempts[shard.id] += 1
        avoid.setdefault(shard.id, set()).add(task.label)
        if in_flight(shard.id):  # its other copy may still succeed
            return
        if attempts[shard.id] >= policy.max_attempts:
            finished.add(shard.id)
            report.failed.append((shard, why))
            log(f"shard {shard.id} failed {attempts[shard.id]} times, last on {task.label} ({why}); "
                "its boxes are skipped")
            if on_failed:
                on_failed(shard, why)
        else:
            log(f"shard {shard.id} failed on {task.label} ({why}); it runs again on another device")
            pending.appendleft(shard)

    def accept(ref, task: _Task, result, now: float) -> None:
        finished.add(task.shard.id)
        failing_in_a_row[task.label] = 0
        bisect.insort(shard_seconds, now - task.sent)
        for other in in_flight(task.shard.id):  # the slower copy: its result is not wanted
            forget(other)
            try:
                ray.cancel(other)
            except Exception:
                pass
        if task.copy:
            report.copies_won[task.label] += 1
        result.device = task.label
        on_result(result)

    def handle(ref, now: float) -> None:
        task = forget(ref)
        waiting_since[task.label] = now
        try:
            result = ray.get(ref)
        except Exception as e:
            kind, why = classify(e), first_line(e)
            if kind == "device":
                lose(task.label, why)
                requeue(task.shard)
            elif kind == "memory":
                lose(task.label, f"killed for memory: {why}")
                give_up_or_retry(task, f"out of memory: {why}")
            elif kind == "result":
                log(f"shard {task.shard.id}: its result was lost on {task.label} ({why}); it runs again")
                give_up_or_retry(task, f"result lost: {why}")
            else:
                failing_in_a_row[task.label] += 1
                give_up_or_retry(task, why)
                if failing_in_a_row[task.label] >= policy.max_attempts:
                    lose(task.label, f"{failing_in_a_row[task.label]} shards in a row failed on it, last: {why}")
        else:
            accept(ref, task, result, now)

    def check_hung(now: float) -> None:
        limit = device_timeout(policy, shard_seconds)
        if limit is None:
            return
        for label in list(pool.actors):
            if held[label] and now - waiting_since[label] > limit:
                lose(label, f"no result for {now - waiting_since[label]:.0f} s while holding {held[label]} "
                            f"shards (device timeout {limit:g} s)")

    def speculate(now: float) -> None:
        if pending or not policy.straggler_factor or not shard_seconds:
            return
        limit = max(policy.straggler_floor_s, policy.straggler_factor * _median(shard_seconds))
        for label in [x for x in pool.actors if not held[x]]:
            late = [t for t in tasks.values()
                    if t.label != label and t.shard.id not in copied and now - t.sent > limit]
            if late:
                task = min(late, key=lambda t: t.sent)
                copied.add(task.shard.id)
                report.copies += 1
                log(f"shard {task.shard.id} on {task.label} for {now - task.sent:.0f} s "
                    f"(limit {limit:.1f} s): a copy runs on {label}")
                send(label, task.shard, copy=True)

    while len(finished) < total:
        if stop is not None and stop.is_set():
            raise Stopped("stopped")
        fill()
        if not tasks:
            raise AllDevicesLost(f"every device was lost ({'; '.join(causes) or 'none started'})")
        # One result is enough to act on: the worker that gave it gets its next shard at once.
        ready, _ = ray.wait(list(tasks), num_returns=1, timeout=policy.poll_s)
        if stop is not None and stop.is_set():  # before the errors a Ctrl-C may have caused in the workers
            raise Stopped("stopped")
        now = time.monotonic()
        for ref in ready:
            handle(ref, now)
        check_hung(now)
        speculate(now)
    for ref in list(tasks):  # copies whose sibling won before they were looked at
        forget(ref)
        try:
            ray.cancel(ref)
        except Exception:
            pass
    return report
