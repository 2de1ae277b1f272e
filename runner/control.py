"""How a command drives cluster/: its Ray session, its dispatch policy, and Ctrl-C."""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from cluster.dispatch import DispatchPolicy
from cluster.session import ray_session
from runner.config import RunConfig


def session_for(cfg: RunConfig):
    """The Ray session of a command: a private Ray for ``--devices``, or ``--address``'s cluster."""
    return ray_session(cfg.devices, cfg.address, cfg.soc_version)


def dispatch_policy(cfg: RunConfig) -> DispatchPolicy:
    return DispatchPolicy(straggler_factor=cfg.straggler_factor, straggler_floor_s=cfg.straggler_floor,
                          device_timeout_s=cfg.device_timeout)


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
