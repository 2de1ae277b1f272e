"""The shard queue's rules, with no Ray in it: which worker gets which shard, and what a failure means.

``ShardQueue`` hands shards out breadth first (one to every worker, then a second
each), so every worker starts at once and faster ones take more. It never waits
for ever:

- a worker that returns nothing for the device timeout while holding shards is
  declared lost; its shards go to the others;
- when no shard is left to hand out and a worker is idle, a shard in flight for
  longer than ``straggler_factor`` x the median shard time (and ``straggler_floor_s``)
  is sent to the idle worker too: the first result wins, the other copy is unwanted;
- a shard whose own code raised runs again on another worker, ``max_attempts`` runs
  in all, then it is given up; the worker is kept, unless that many different shards
  in a row failed on it (a broken device);
- a result that came back incomplete for its worker's own reasons (images its node
  could not read) is ``rejected``: the shard runs again on a worker outside the ones
  to avoid while there is one, and a worker whose rejected shards others then finish
  ``READ_STRIKES`` times is dropped. A copy never wins by leaving boxes out.

The queue sends through the ``send(worker, shard) -> token`` it is given and learns
the outcome of each token from the caller (``succeeded``, ``failed``); Ray's part,
waiting and getting, is ``cluster.dispatch.run_shards``. Shards need an ``id``.
Its ``DispatchReport`` also notes, in unix time, what the run's timeline shows: a worker
lost, a copy sent, the queue empty, and each run cancelled because its sibling came first.
"""
from __future__ import annotations

import bisect
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from tasks.timeline import MARKER_KINDS

#: Shards queued per worker: one runs while the next is prepared.
IN_FLIGHT_PER_WORKER = 2
#: The automatic device timeout: 10 x the median shard time, never under 5 minutes. A
#: healthy device's shards take about the same time (whole batches of the same size),
#: so 10x is far outside its spread; the floor covers the first shards, before any
#: time is known, and hosts whose shards are slow by nature (bs 64 on a CPU).
TIMEOUT_FACTOR = 10.0
TIMEOUT_FLOOR_S = 300.0
#: Shards another worker finished after a worker could not: then that worker is dropped.
READ_STRIKES = 2

#: What a failed run of a shard says (``cluster.dispatch.classify`` reads Ray's errors):
#: its own code raised; its result was lost on the way (the worker lives); the worker
#: was killed for memory; the worker or its node is gone.
FAILURE_KINDS = ("task", "result", "memory", "device")


@dataclass(frozen=True)
class DispatchPolicy:
    in_flight: int = IN_FLIGHT_PER_WORKER
    #: A copy only uses a worker that would otherwise idle at the run's tail; 3x the median
    #: is well past the normal spread of shard times (same batches; the host's noise is
    #: tens of percent), and the floor keeps short tails from being copied for nothing.
    straggler_factor: float = 3.0  # 0: no copies
    straggler_floor_s: float = 10.0
    device_timeout_s: float | None = None  # None: automatic (TIMEOUT_*); 0: never
    max_attempts: int = 3  # runs of one shard that raised, across workers, before it is given up
    poll_s: float = 0.2  # how often timeouts, copies and the stop event are looked at


#: What the queue notes for the run's timeline: its marker kinds.
EVENT_KINDS = MARKER_KINDS


@dataclass(frozen=True)
class QueueEvent:
    """Something the queue did at one moment: a worker dropped, a copy sent, nothing left to hand out."""

    time: float  # unix seconds: the timeline sets it beside the workers' own unix times
    kind: str  # one of EVENT_KINDS
    worker: str | None  # None: the queue as a whole
    text: str
    shard: object = None  # the copied shard's id


@dataclass(frozen=True)
class CancelledRun:
    """A run of a shard whose result was not wanted (its sibling came first): the timeline's lost span."""

    shard: object  # shard id
    worker: str
    sent: float  # unix seconds
    cancelled: float
    copy: bool  # this run was the speculative copy (else the copy beat it)


@dataclass
class DispatchReport:
    lost: dict[str, str] = field(default_factory=dict)  # worker -> why it was dropped
    failed: list[tuple[object, str]] = field(default_factory=list)  # (shard, error) given up
    copies: int = 0  # speculative copies sent
    copies_won: Counter = field(default_factory=Counter)  # worker -> copies it ran that came first
    won_by_copy: set = field(default_factory=set)  # (shard id, worker) of results kept from a copy
    cancelled: list[CancelledRun] = field(default_factory=list)  # runs whose sibling won
    events: list[QueueEvent] = field(default_factory=list)  # in the order they happened


@dataclass
class Sent:
    """One shard on its way to one worker."""

    shard: object
    worker: str
    at: float  # monotonic seconds
    copy: bool
    wall: float = 0.0  # unix seconds, for the timeline


@dataclass
class Failure:
    """What the queue made of a failed run: the workers it dropped, the shard it gave up (or None)."""

    dropped: list[str] = field(default_factory=list)
    given_up: tuple[object, str] | None = None


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


class ShardQueue:
    """Every shard run once, whatever the workers do; see the module's text."""

    def __init__(self, shards: Iterable, workers: Iterable[str], policy: DispatchPolicy,
                 send: Callable[[str, object], Hashable], log: Callable[[str], None]) -> None:
        self.policy, self.report = policy, DispatchReport()
        self._send, self._log = send, log
        self._pending = deque(shards)
        self._total = len(self._pending)
        self._workers = list(workers)  # those still in the run, in fill order
        self._sent: dict[Hashable, Sent] = {}  # token -> what it carries
        self._held = Counter()  # worker -> shards in flight
        self._silent_since: dict[str, float] = {}  # worker -> since when it holds shards and returned nothing
        self._finished: set = set()  # shard ids with a result, or given up
        self._copied: set = set()  # shard ids sent a second time
        self._attempts = Counter()  # shard id -> runs that raised
        self._tried: dict[object, set[str]] = {}  # shard id -> workers it raised on
        self._failing_in_a_row = Counter()  # worker -> distinct shards in a row that raised on it
        self._rejected: dict[object, list[tuple[str, str]]] = {}  # shard id -> (worker, why) of incomplete runs
        self._read_strikes = Counter()  # worker -> its rejected shards that another worker then finished
        self._to_drop: list[str] = []  # workers dropped by the last succeeded(), for the caller to stop
        self._shard_seconds: list[float] = []  # kept sorted: its median is read at every poll

    # ------------------------------------------------------------ reading

    @property
    def done(self) -> bool:
        """Every shard has a result or was given up."""
        return len(self._finished) >= self._total

    @property
    def tokens(self) -> list[Hashable]:
        """The tokens in flight, oldest first: what to wait on."""
        return list(self._sent)

    @property
    def workers(self) -> list[str]:
        return list(self._workers)

    def worker_of(self, token: Hashable) -> str:
        return self._sent[token].worker

    def all_lost(self) -> str:
        """The line for a queue with shards left and no worker."""
        causes = "; ".join(f"{w}: {why}" for w, why in self.report.lost.items())
        return f"every device was lost ({causes or 'none started'})"

    # ------------------------------------------------------------ sending

    def fill(self, now: float) -> None:
        """Top every worker up to ``policy.in_flight`` shards, one level at a time."""
        had_pending = bool(self._pending)
        for level in range(self.policy.in_flight):
            for worker in self._workers:
                if self._pending and self._held[worker] <= level and (shard := self._take(worker)) is not None:
                    self._dispatch(worker, shard, now, copy=False)
        if had_pending and not self._pending:  # again after a lost worker's shards went back
            self._note("queue_empty", None, "queue empty")

    def _take(self, worker: str):
        """The first pending shard for ``worker``: one that raised on it waits for a worker
        that has not tried it, while there is one."""
        for k, shard in enumerate(self._pending):
            tried = self._tried.get(shard.id, ())
            if worker not in tried or all(w in tried for w in self._workers):
                del self._pending[k]
                return shard
        return None

    def _dispatch(self, worker: str, shard, now: float, copy: bool) -> None:
        if not self._held[worker]:
            self._silent_since[worker] = now
        token = self._send(worker, shard)
        self._sent[token] = Sent(shard, worker, now, copy, time.time())
        self._held[worker] += 1

    def copy_late(self, now: float) -> None:
        """Send a late shard to each idle worker, once per shard, when nothing else is left to send."""
        if self._pending or not self.policy.straggler_factor or not self._shard_seconds:
            return
        limit = max(self.policy.straggler_floor_s, self.policy.straggler_factor * _median(self._shard_seconds))
        for worker in [w for w in self._workers if not self._held[w]]:
            late = [s for s in self._sent.values()
                    if s.worker != worker and s.shard.id not in self._copied and now - s.at > limit]
            if late:
                oldest = min(late, key=lambda s: s.at)
                self._copied.add(oldest.shard.id)
                self.report.copies += 1
                line = (f"shard {oldest.shard.id} on {oldest.worker} for {now - oldest.at:.0f} s "
                        f"(limit {limit:.1f} s): a copy runs on {worker}")
                self._log(line)
                self._note("copy_sent", worker, line, oldest.shard.id)
                self._dispatch(worker, oldest.shard, now, copy=True)

    # ------------------------------------------------------------ outcomes

    def succeeded(self, token: Hashable, now: float) -> tuple[Sent, list[Hashable]]:
        """The shard of ``token`` is done: what it carried, and the tokens of its other copies,
        now unwanted (the caller cancels them)."""
        sent = self._forget(token)
        self._silent_since[sent.worker] = now
        self._finished.add(sent.shard.id)
        self._failing_in_a_row[sent.worker] = 0
        bisect.insort(self._shard_seconds, now - sent.at)
        unwanted = self._copies_of(sent.shard.id)
        for other in unwanted:
            self._cancel(other)
        if sent.copy:
            self.report.copies_won[sent.worker] += 1
            self.report.won_by_copy.add((sent.shard.id, sent.worker))
        self._strike(sent)
        return sent, unwanted

    def rejected(self, token: Hashable, why: str, avoid: Iterable[str], now: float) -> bool:
        """The run of ``token`` came back incomplete for its worker's own reasons (``why``): its shard runs
        again on a worker outside ``avoid`` (its own worker always included) while there is one. False: no
        worker is left to try, and the caller takes the result as it is (``succeeded``)."""
        sent = self._sent[token]
        tried = self._tried.setdefault(sent.shard.id, set())
        tried.update({sent.worker, *avoid})
        sibling = [t for t in self._copies_of(sent.shard.id) if t != token]
        if not sibling and all(w in tried for w in self._workers):
            return False
        self._forget(token)
        self._silent_since[sent.worker] = now
        self._rejected.setdefault(sent.shard.id, []).append((sent.worker, why))
        self._log(f"shard {sent.shard.id} on {sent.worker}: {why}; it runs again on another device")
        if not sibling:
            self._pending.appendleft(sent.shard)
        return True

    def drops(self) -> list[str]:
        """The workers the last ``succeeded`` dropped (their reads fail where others' do not); once."""
        dropped, self._to_drop = self._to_drop, []
        return dropped

    def _strike(self, sent: Sent) -> None:
        """Another worker finished what these could not read: a strike each; READ_STRIKES drops one."""
        for worker, why in self._rejected.pop(sent.shard.id, []):
            if worker == sent.worker or worker not in self._workers:
                continue
            self._read_strikes[worker] += 1
            if self._read_strikes[worker] >= READ_STRIKES:
                self._to_drop += self.lose(worker, f"{self._read_strikes[worker]} shards whose images other devices "
                                                   f"read could not be read on it (last: {why})")

    def failed(self, token: Hashable, kind: str, why: str, now: float) -> Failure:
        """A run of a shard failed with a ``FAILURE_KINDS`` kind; retried, given up, or its worker dropped."""
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}; one of {', '.join(FAILURE_KINDS)}")
        sent = self._forget(token)
        self._silent_since[sent.worker] = now
        outcome = Failure()
        if kind == "device":
            outcome.dropped += self.lose(sent.worker, why)
            self._requeue(sent.shard)
            return outcome
        if kind == "memory":
            outcome.dropped += self.lose(sent.worker, f"killed for memory: {why}")
            outcome.given_up = self._retry_or_give_up(sent, f"out of memory: {why}")
        elif kind == "result":
            self._log(f"shard {sent.shard.id}: its result was lost on {sent.worker} ({why}); it runs again")
            outcome.given_up = self._retry_or_give_up(sent, f"result lost: {why}")
        else:
            self._failing_in_a_row[sent.worker] += 1
            outcome.given_up = self._retry_or_give_up(sent, why)
            if (n := self._failing_in_a_row[sent.worker]) >= self.policy.max_attempts:
                outcome.dropped += self.lose(sent.worker, f"{n} shards in a row failed on it, last: {why}")
        return outcome

    def hung(self, now: float) -> list[str]:
        """Drop the workers that hold shards and returned nothing for the device timeout; their names."""
        limit = device_timeout(self.policy, self._shard_seconds)
        if limit is None:
            return []
        dropped = []
        for worker in list(self._workers):
            silent = now - self._silent_since.get(worker, now)
            if self._held[worker] and silent > limit:
                dropped += self.lose(worker, f"no result for {silent:.0f} s while holding {self._held[worker]} "
                                             f"shards (device timeout {limit:g} s)")
        return dropped

    def lose(self, worker: str, why: str) -> list[str]:
        """Drop ``worker`` for the rest of the queue; its shards go back. ``[worker]``, or [] if gone already."""
        if worker not in self._workers:
            return []
        self._workers.remove(worker)
        self.report.lost[worker] = why
        self._log(f"device {worker} lost ({why}); its shards go to the other devices")
        self._note("device_lost", worker, f"{worker} lost: {why}")
        for token in [t for t, s in self._sent.items() if s.worker == worker]:
            self._requeue(self._forget(token).shard)
        return [worker]

    def unwanted(self) -> list[Hashable]:
        """Once done: the copies still in flight whose shard finished first elsewhere (to cancel)."""
        tokens = list(self._sent)
        for token in tokens:
            self._cancel(token)
        return tokens

    # ------------------------------------------------------------ bookkeeping

    def _forget(self, token: Hashable) -> Sent:
        sent = self._sent.pop(token)
        self._held[sent.worker] -= 1
        return sent

    def _cancel(self, token: Hashable) -> None:
        """Forget an unwanted run, noting when it was sent and dropped (the timeline's ``won: false`` span)."""
        sent = self._forget(token)
        self.report.cancelled.append(CancelledRun(sent.shard.id, sent.worker, sent.wall, time.time(), sent.copy))

    def _note(self, kind: str, worker: str | None, text: str, shard=None) -> None:
        self.report.events.append(QueueEvent(time.time(), kind, worker, text, shard))

    def _copies_of(self, shard_id) -> list[Hashable]:
        return [t for t, s in self._sent.items() if s.shard.id == shard_id]

    def _requeue(self, shard) -> None:
        if shard.id not in self._finished and not self._copies_of(shard.id):
            self._pending.appendleft(shard)

    def _retry_or_give_up(self, sent: Sent, why: str) -> tuple[object, str] | None:
        """Count a failed run; the shard runs again elsewhere, or is given up: then ``(shard, why)``."""
        shard = sent.shard
        self._attempts[shard.id] += 1
        self._tried.setdefault(shard.id, set()).add(sent.worker)
        if self._copies_of(shard.id):  # its other copy may still succeed
            return None
        if self._attempts[shard.id] < self.policy.max_attempts:
            self._log(f"shard {shard.id} failed on {sent.worker} ({why}); it runs again on another device")
            self._pending.appendleft(shard)
            return None
        self._finished.add(shard.id)
        self.report.failed.append((shard, why))
        self._log(f"shard {shard.id} failed {self._attempts[shard.id]} times, last on {sent.worker} ({why}); "
                  "its boxes are skipped")
        return shard, why
