"""How a command drives cluster/: its Ray session, its shards on the devices, and Ctrl-C.

``run_stage`` is the one way both stages (the pose run and ``runner detect``) run their
shards: the queue's rules (``cluster.queue``), Ctrl-C between two Ray calls, and the
cluster's errors turned into the stage's own line, saying what is kept and how to go on.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cluster.dispatch import run_shards
from cluster.errors import AllDevicesLost, Stopped
from cluster.pool import ActorPool
from cluster.queue import DispatchPolicy, DispatchReport
from cluster.session import ray_session
from runner.config import RunConfig
from runner.errors import Interrupted, RunError


def session_for(cfg: RunConfig):
    """The Ray session of a command: a private Ray for ``--devices``, or ``--address``'s cluster."""
    return ray_session(cfg.cluster.devices, cfg.cluster.address, cfg.cluster.soc_version)


@dataclass(frozen=True)
class StageLines:
    """What a stage tells the user when it stops early."""

    interrupted: Callable[[], str]  # Ctrl-C: what is saved and how to go on (asked when it happens)
    all_lost: str  # after 'every device was lost (...); ': what is kept and how to go on


def run_stage(pool: ActorPool, shards: list, on_result: Callable, log: Callable, policy: DispatchPolicy,
              on_failed: Callable, lines: StageLines, package: Callable | None = None,
              check: Callable | None = None) -> DispatchReport:
    """Every shard once on the pool's workers (``cluster.dispatch.run_shards``); one line when it cannot."""
    stop = threading.Event()
    try:
        with ctrl_c_stops(stop):
            return run_shards(pool, shards, on_result, log, policy, on_failed, stop, package, check)
    except (Stopped, KeyboardInterrupt):
        raise Interrupted(lines.interrupted()) from None
    except AllDevicesLost as e:
        raise RunError(f"{e}; {lines.all_lost}") from None


@contextmanager
def ctrl_c_stops(stop: threading.Event) -> Iterator[None]:
    """The first Ctrl-C sets ``stop``, so the dispatch ends between two Ray calls, never
    inside one or inside a journal write; a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # a run in a thread (tests): signals go to the main thread's own handler
        return

    def handler(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
