"""Ray's side of the shard queue: send, wait, get, cancel, drop.

``run_shards`` drives a ``cluster.queue.ShardQueue`` over a pool's workers: each
token is the object ref of one ``run_shard`` call; every result reaches
``on_result`` exactly once, labelled with the device that computed it. The rules
(fill order, retries, time-outs, copies) are the queue's; this module only
translates Ray's outcomes into them. Any actor with a ``run_shard(shard)`` whose
result has a ``device`` field will do (the pose ``Worker``, the detector's
``DetectWorker``).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from cluster.errors import AllDevicesLost, Stopped, WorkerBroken, first_line
from cluster.pool import ActorPool
from cluster.queue import DispatchPolicy, DispatchReport, ShardQueue


def classify(error: BaseException) -> str:
    """The ``cluster.queue.FAILURE_KINDS`` kind of an error ``ray.get`` raised for a shard.

    Only Ray's errors are a worker's outcome; anything else raised here is the
    driver's own bug, and ``run_shards`` lets it stop the run with its traceback.
    """
    from ray.exceptions import ObjectLostError, ObjectStoreFullError, OutOfMemoryError, RayTaskError

    if isinstance(error, RayTaskError):
        return "device" if isinstance(error.cause, WorkerBroken) else "task"
    if isinstance(error, (ObjectLostError, ObjectStoreFullError)):  # OwnerDiedError is an ObjectLostError
        return "result"
    if isinstance(error, OutOfMemoryError):
        return "memory"
    return "device"  # RayActorError, NodeDiedError, WorkerCrashedError and Ray's other errors


def run_shards(pool: ActorPool, shards, on_result: Callable, log: Callable,
               policy: DispatchPolicy = DispatchPolicy(), on_failed: Callable | None = None,
               stop: threading.Event | None = None, package: Callable | None = None,
               check: Callable | None = None) -> DispatchReport:
    """Run every shard once on the pool's workers (``cluster.queue``'s rules).

    ``package(worker, shard)`` is the shard as that worker gets it (its images' bytes
    added); ``check(worker, result)`` may refuse a result, ``(why, workers to avoid)``,
    so that its shard runs elsewhere (``ShardQueue.rejected``). Raises ``AllDevicesLost``
    when shards remain and no worker does, ``Stopped`` when ``stop`` is set (checked
    between two Ray calls, never inside one).
    """
    queue = ShardQueue(shards, list(pool.actors), policy,
                       lambda worker, shard: pool.actors[worker].run_shard.remote(
                           package(worker, shard) if package else shard), log)
    while not queue.done:
        _check(stop)
        queue.fill(time.monotonic())
        if not queue.tokens:
            raise AllDevicesLost(queue.all_lost())
        # One result is enough to act on: the worker that gave it gets its next shard at once.
        ready, _ = pool.session.ray.wait(queue.tokens, num_returns=1, timeout=policy.poll_s)
        _check(stop)  # before the errors a Ctrl-C may have caused in the workers
        now = time.monotonic()
        for ref in ready:
            _settle(pool, queue, ref, now, on_result, on_failed, check)
        _drop(pool, queue, queue.hung(now))
        queue.copy_late(now)
    pool.cancel(queue.unwanted())  # copies whose sibling won before they were looked at
    return queue.report


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Stopped("stopped")


def _settle(pool: ActorPool, queue: ShardQueue, ref, now: float, on_result: Callable,
            on_failed: Callable | None, check: Callable | None = None) -> None:
    from ray.exceptions import RayError

    try:
        result = pool.session.ray.get(ref)
    except RayError as e:
        failure = queue.failed(ref, classify(e), first_line(e), now)
        _drop(pool, queue, failure.dropped)
        if failure.given_up is not None and on_failed is not None:
            on_failed(*failure.given_up)
        return
    refused = check(queue.worker_of(ref), result) if check else None
    if refused is not None and queue.rejected(ref, *refused, now):
        return
    sent, unwanted = queue.succeeded(ref, now)
    pool.cancel(unwanted)
    _drop(pool, queue, queue.drops())
    result.device = sent.worker
    on_result(result)


def _drop(pool: ActorPool, queue: ShardQueue, workers: list[str]) -> None:
    for worker in workers:
        pool.lose(worker, queue.report.lost[worker])
