"""The device workers of one command: one named Ray actor per device, pinned by ``placements``.

``ActorPool`` starts them, describes where each landed, names them, calls a method on
all of them (a sweep's ``set_batch``), drops the ones that fail, and at the end
closes them: each worker's ``close()`` frees its session on its own device thread,
then the worker exits; only one that does not answer in time is killed. Any
``cluster.worker.DeviceWorker`` will do (the pose ``Worker``, the detector's
``DetectWorker``).
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from cluster.errors import WorkerStartError, first_line
from cluster.placement import Placement, name_devices, placements
from cluster.queue import IN_FLIGHT_PER_WORKER
from cluster.session import Session

#: The longest a worker may take to start (open its session, warm up) or to switch models
#: (a sweep's next OM): loading a large OM takes seconds to a minute; past this it is hung.
ANSWER_TIMEOUT_S = 600.0
#: The longest the workers together may take to close their sessions (an OM unloads in
#: about a second); past it the ones still closing are killed.
CLOSE_TIMEOUT_S = 60.0


class ActorPool:
    def __init__(self, session: Session, actor_class: type, backend: str, threads: int,
                 max_concurrency: int = IN_FLIGHT_PER_WORKER, log: Callable[[str], None] = print) -> None:
        self.session, self.actor_class, self.backend, self.threads = session, actor_class, backend, threads
        self.max_concurrency, self.log = max_concurrency, log
        self.actors: dict[str, object] = {}  # label -> handle, the workers still in the command
        self.described: list[dict] = []  # every worker started, as describe() gave it, named
        self.lost: dict[str, str] = {}  # label -> why it was dropped
        self.killed: list[str] = []  # labels of the workers this pool killed (lost, or hung in close)
        self.close_errors: dict[str, str] = {}  # label -> what its close() raised

    @property
    def started(self) -> bool:
        return bool(self.described)

    def start(self, make_config: Callable[[Placement], object]) -> list[dict]:
        """One actor per device, ``make_config(placement)`` its constructor's argument.

        When one fails to start, all are killed (WorkerStartError).
        """
        from ray.exceptions import RayError

        ray = self.session.ray
        run_tag = uuid.uuid4().hex[:8]  # actor names are cluster-wide; commands must not collide
        handles, names = [], []
        for k, p in enumerate(placements(self.session.devices, self.backend, self.threads,
                                         self.session.cpus_per_worker)):
            names.append(f"runner-{run_tag}-{k}")
            handles.append(ray.remote(max_concurrency=self.max_concurrency, max_restarts=0, **p.options)(
                self.actor_class).options(name=names[-1]).remote(make_config(p)))
        try:
            described = ray.get([h.describe.remote() for h in handles], timeout=ANSWER_TIMEOUT_S)
        except RayError as e:  # GetTimeoutError too: a worker that does not start in time is hung
            for h in handles:
                ray.kill(h)
            raise WorkerStartError(f"a device worker failed to start: {first_line(e)}") from None
        shared = shared_chips(described)
        if shared:  # two sessions on one chip would each measure half of it, or fail: stop before any shard
            for h in handles:
                ray.kill(h)
            raise WorkerStartError(f"two device workers opened one NPU ({shared}): each worker must own its chip "
                                   "(docs/ascend.md#ray-pinning); run one Ray node per host, or name distinct chips")
        labels = name_devices(described, self.session.devices, self.session.existing)
        for d, label, name in zip(described, labels, names):
            d.update(device=label, actor=name)
        self.actors, self.described = dict(zip(labels, handles)), described
        return self.current()

    def current(self) -> list[dict]:
        """The described workers still in the command."""
        return [dict(d) for d in self.described if d["device"] in self.actors]

    def call_all(self, method: str, *args) -> dict[str, str]:
        """``method(*args)`` on every worker; those that fail are dropped: {label: why}."""
        from ray.exceptions import RayError

        refs = {label: getattr(a, method).remote(*args) for label, a in self.actors.items()}
        failed = {}
        for label, ref in refs.items():
            try:
                self.session.ray.get(ref, timeout=ANSWER_TIMEOUT_S)
            except RayError as e:  # GetTimeoutError too: a device that does not answer is lost
                failed[label] = first_line(e)
                self.lose(label, f"{method} failed: {failed[label]}")
        return failed

    def cancel(self, refs: Iterable) -> None:
        """Cancel calls whose result is no longer wanted (a copy that lost); a finished one is left alone."""
        for ref in refs:
            self.session.ray.cancel(ref)

    def lose(self, label: str, why: str) -> None:
        """Drop a worker for the rest of the command; killed, so it takes no more work."""
        handle = self.actors.pop(label, None)
        self.lost.setdefault(label, why)
        if handle is not None:
            self._kill(label, handle)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close every worker's session, then let it exit; one that does not answer in ``timeout_s`` is killed."""
        from ray.exceptions import GetTimeoutError, RayError, RayTaskError

        ray, actors, self.actors = self.session.ray, self.actors, {}
        refs = {label: handle.close.remote() for label, handle in actors.items()}
        deadline = time.monotonic() + timeout_s
        for label, ref in refs.items():
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except GetTimeoutError:
                self.log(f"device {label}: its session did not close within {timeout_s:g} s; killed")
                self._kill(label, actors[label])
                continue
            except RayTaskError as e:  # its close raised: the session's state is unknown
                self.close_errors[label] = first_line(e)
                self.log(f"device {label}: closing its session failed ({self.close_errors[label]}); killed")
                self._kill(label, actors[label])
                continue
            except RayError:  # it died on its way out: nothing left to close or kill
                continue
            actors[label].__ray_terminate__.remote()  # Ray's graceful exit: after close, nothing runs

    def _kill(self, label: str, handle) -> None:
        self.killed.append(label)
        self.session.ray.kill(handle, no_restart=True)


def shared_chips(described: list[dict]) -> str:
    """'chip 0 on host-a: pids 11, 12' for each NPU that more than one worker opened; '' when none did.

    Chips are physical, so workers are grouped by host, not by Ray node: two raylets on
    one host share its chips.
    """
    by_chip: dict[tuple[str, int], list[int]] = {}
    for d in described:
        if d.get("chip") is not None:
            by_chip.setdefault((d["host"], d["chip"]), []).append(d["pid"])
    return "; ".join(f"chip {chip} on {host}: pids {', '.join(map(str, pids))}"
                     for (host, chip), pids in sorted(by_chip.items()) if len(pids) > 1)


@contextmanager
def actor_pool(session: Session, actor_class: type, backend: str, threads: int,
               max_concurrency: int = IN_FLIGHT_PER_WORKER, log: Callable[[str], None] = print) -> Iterator[ActorPool]:
    pool = ActorPool(session, actor_class, backend, threads, max_concurrency, log)
    try:
        yield pool
    finally:
        pool.close()
