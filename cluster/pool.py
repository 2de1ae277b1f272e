"""The device workers of one command: one named Ray actor per device, pinned by ``placements``.

``ActorPool`` starts them, describes where each landed, names them, calls a method on
all of them (a sweep's ``set_batch``), drops the ones that fail and kills them at the
end. It is the pose ``Worker``'s and the detector's ``DetectWorker``'s alike: any class
with a ``describe()`` and a one-argument constructor will do.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from cluster.errors import WorkerStartError, first_line
from cluster.placement import Placement, name_devices, placements
from cluster.session import Session

#: Shards queued per actor: one runs while the next is prepared.
IN_FLIGHT_PER_ACTOR = 2
#: The longest a worker may take to start (open its session, warm up) or to switch models
#: (a sweep's next OM): loading a large OM takes seconds to a minute; past this it is hung.
ANSWER_TIMEOUT_S = 600.0


class ActorPool:
    def __init__(self, session: Session, actor_class: type, backend: str, threads: int,
                 max_concurrency: int = IN_FLIGHT_PER_ACTOR) -> None:
        self.session, self.actor_class, self.backend, self.threads = session, actor_class, backend, threads
        self.max_concurrency = max_concurrency
        self.actors: dict[str, object] = {}  # label -> handle, the workers still in the command
        self.described: list[dict] = []  # every worker started, as describe() gave it, named
        self.lost: dict[str, str] = {}  # label -> why it was dropped

    @property
    def started(self) -> bool:
        return bool(self.described)

    def start(self, make_config: Callable[[Placement], object]) -> list[dict]:
        """One actor per device, ``make_config(placement)`` its constructor's argument.

        When one fails to start, all are killed (WorkerStartError).
        """
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
        except Exception as e:
            for h in handles:
                ray.kill(h)
            raise WorkerStartError(f"a device worker failed to start: {first_line(e)}") from None
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
        ray = self.session.ray
        refs = {label: getattr(a, method).remote(*args) for label, a in self.actors.items()}
        failed = {}
        for label, ref in refs.items():
            try:
                ray.get(ref, timeout=ANSWER_TIMEOUT_S)
            except Exception as e:  # GetTimeoutError too: a device that does not answer is lost
                failed[label] = first_line(e)
                self.lose(label, f"{method} failed: {failed[label]}")
        return failed

    def lose(self, label: str, why: str) -> None:
        """Drop a worker for the rest of the command; killed, so it takes no more work."""
        handle = self.actors.pop(label, None)
        self.lost.setdefault(label, why)
        if handle is not None:
            try:
                self.session.ray.kill(handle, no_restart=True)
            except Exception:  # already dead, or its node is gone
                pass

    def close(self) -> None:
        for handle in self.actors.values():
            try:
                self.session.ray.kill(handle)
            except Exception:
                pass
        self.actors = {}


@contextmanager
def actor_pool(session: Session, actor_class: type, backend: str, threads: int,
               max_concurrency: int = IN_FLIGHT_PER_ACTOR) -> Iterator[ActorPool]:
    pool = ActorPool(session, actor_class, backend, threads, max_concurrency)
    try:
        yield pool
    finally:
        pool.close()
