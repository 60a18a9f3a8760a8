"""The scheduling policy: which shard runs where, when to retry, when to give up, when to stop.

    queue ─► dispatch (≤ IN_FLIGHT_PER_WORKER per worker; a suspect alone) ─► pool ─► outcome
      ▲                                                                               │
      └──────────── retry (charged or free) ◄── failed / worker died / unavailable ◄──┘
                                                  ▲
                                     stalled ─────┘ (heartbeats: no progress for stall_timeout)

`Scheduler` knows nothing about Ray: it drives any `WorkerPool` (the Protocol below), which
reports how each submitted shard ended as one of five outcomes, and what each worker's last
heartbeat (`run/heartbeat.py`) said. `run/pool.py` is the Ray implementation;
`tests/unit/test_scheduler.py` drives the same policy with a fake pool. The rules are those of
docs/architecture.md, "Retries".
"""

from __future__ import annotations

import signal
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol, Sequence, Union

from zimage_batch.run.heartbeat import Heartbeat
from zimage_batch.run.plan import Shard

IN_FLIGHT_PER_WORKER = 2  # one generating, one reading or uploading beside it
MAX_FREE_REQUEUES = 20  # re-dispatches not charged to a shard (its worker died running another)
WAIT_S = 1.0  # longest wait for an outcome between checks of the stop request and progress ticks
STALL_FLOOR_S = 300.0  # the derived stall timeout: at least this, ...
STALL_BATCHES = 10  # ... and at least this many times the worker's slowest batch so far
START_TIMEOUT_S = 600.0  # a worker silent since it was started (placed, spawned, runtime_env set up)
STALL_CHECK_S = 5.0  # seconds between looks for stalled workers (a sixtieth of a shorter stall_timeout)
DURATIONS_KEPT = 1000  # latest finished shards' durations the speculation's median is taken over
SPECULATE_MARGIN = 0.1  # a second copy must be expected to end this share of a shard's time sooner
MAX_COPIES = 3  # running copies of one shard at most (the first and two more)
SPECULATE_EVERY = 0.02  # share of a shard's time between two looks for tail shards to copy


# ---------------------------------------------------------------------- what a pool reports
@dataclass(frozen=True)
class Finished:
    """The shard ran to its end; `result` is the worker's return value, passed on untouched."""

    result: Any


@dataclass(frozen=True)
class ShardFailed:
    """The shard's own code raised on a live worker: the shard is charged an attempt."""

    reason: str


@dataclass(frozen=True)
class WorkerDied:
    """The worker died while it ran the shard: the worker is replaced."""

    reason: str


@dataclass(frozen=True)
class FailedToStart:
    """The worker died before it could run anything (its model did not load, …): no shard's fault."""

    reason: str


@dataclass(frozen=True)
class Unavailable:
    """The worker cannot be reached for now, but is not dead: the shard runs again, free of charge."""

    reason: str


Outcome = Union[Finished, ShardFailed, WorkerDied, FailedToStart, Unavailable]
Ticket = Hashable  # what a pool hands back for one submitted shard


class WorkerPool(Protocol):
    """Workers numbered 0..size-1 that run shards."""

    size: int

    def submit(self, worker: int, shard: Shard, attempt: int) -> Ticket:
        """Start `shard` (its `attempt`-th try) on `worker`; the ticket names this run of it."""

    def wait(self, tickets: Sequence[Ticket], timeout: float) -> list[tuple[Ticket, Outcome]]:
        """Outcomes of some `tickets` that ended, waiting up to `timeout` seconds for one."""

    def replace(self, worker: int) -> None:
        """Put a fresh worker in the place of `worker` (its tickets are forgotten)."""

    def heartbeats(self) -> dict[int, Heartbeat]:
        """The heartbeats answered since the last call, by worker; never waits long (a frozen
        worker answers nothing, and is not waited for)."""

    # A pool may also have `cancel(ticket)`: the scheduler no longer waits for that ticket (the
    # other copy of its shard finished); the pool stops it if it can, and never reports it.


# ---------------------------------------------------------------------- rules and results
@dataclass(frozen=True)
class Rules:
    """The job's limits the scheduler enforces."""

    max_attempts: int = 3
    grace_period: float = 60.0  # seconds in-flight shards get once a stop is requested
    in_flight_per_worker: int = IN_FLIGHT_PER_WORKER
    max_free_requeues: int = MAX_FREE_REQUEUES
    speculate: bool = False  # run a second copy of tail shards on idle workers (the job's default is on)
    stall_timeout: float | None = None  # seconds without progress; None: derived (`stall_timeout_for`)


def stall_timeout_for(rules: Rules, slowest_batch_s: float) -> float:
    """The job's stall_timeout, else max(STALL_FLOOR_S, STALL_BATCHES x the worker's slowest batch)."""
    if rules.stall_timeout is not None:
        return rules.stall_timeout
    return max(STALL_FLOOR_S, STALL_BATCHES * slowest_batch_s)


@dataclass(frozen=True)
class Finish:
    """How a scheduler run ended: shards given up (name -> last error) and whether it was stopped."""

    failed: dict[str, str]
    stopped: bool


class WorkersCannotStart(RuntimeError):
    """Workers died before they could start, `size × max_attempts` times in a row."""


# What a worker's start-up failure points at, by the error it names; the model hint only for model errors.
_START_HINTS = (
    (("ManifestError",), "check that the manifest is readable from the workers' nodes (shared filesystem or s3://)"),
    (("StorageError", "PermissionError"), "check that OUTPUT is writable from the workers' nodes (shared filesystem or s3://)"),
    (("ModuleNotFoundError", "ImportError"), "check that zimage-batch is installed on the workers' nodes"),
    (("ModelSourceError", "OutOfMemoryError", "safetensors", "model_index", "checkpoint", "from_pretrained", "CUDA"),
     "check that the model loads on the workers' nodes"),
)


def start_failure_message(reason: str) -> str:
    """The one line that ends a run whose workers cannot start, with a hint matching `reason`."""
    hint = next((h for words, h in _START_HINTS if any(w in reason for w in words)), None)
    return f"workers keep dying before they can start ({reason})" + (f"; {hint}" if hint else "")


# ---------------------------------------------------------------------- stop requests
class StopRequest:
    """SIGTERM / SIGINT while installed: stop dispatching, let in-flight shards finish within the
    grace period; a second Ctrl-C raises KeyboardInterrupt (abandon them at once)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def request(self) -> None:
        self.requested = True

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def install(self) -> None:
        if sys.platform == "win32":
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever handles them
                pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ---------------------------------------------------------------------- the scheduler
class _InFlight(dict):
    """ticket -> (shard, worker), indexed by worker and by shard name, with each ticket's
    estimated start: a worker runs its shards one after another, so a ticket starts when it is
    submitted to an idle worker, or when the ticket before it on its worker leaves."""

    def __init__(self, clock: Callable[[], float], workers: int, limit: int) -> None:
        super().__init__()
        self.clock, self.limit = clock, limit
        self.open = set(range(workers))  # workers holding fewer than `limit` tickets
        self.on_worker: dict[int, dict[Ticket, None]] = {}  # in submission order
        self.of_shard: dict[str, set[Ticket]] = {}
        self.started: dict[Ticket, float | None] = {}

    def __setitem__(self, ticket: Ticket, value: tuple[Shard, int]) -> None:
        if ticket in self:
            self.pop(ticket)
        shard, worker = value
        super().__setitem__(ticket, value)
        mine = self.on_worker.setdefault(worker, {})
        self.started[ticket] = None if mine else self.clock()
        mine[ticket] = None
        if len(mine) >= self.limit:
            self.open.discard(worker)
        self.of_shard.setdefault(shard.name, set()).add(ticket)

    def pop(self, ticket: Ticket, *default: Any) -> Any:
        if ticket not in self and default:
            return default[0]
        shard, worker = super().pop(ticket)
        mine = self.on_worker[worker]
        del mine[ticket]
        if len(mine) < self.limit:
            self.open.add(worker)
        if not mine:
            del self.on_worker[worker]
        elif self.started[next(iter(mine))] is None:
            self.started[next(iter(mine))] = self.clock()
        copies = self.of_shard[shard.name]
        copies.discard(ticket)
        if not copies:
            del self.of_shard[shard.name]
        del self.started[ticket]
        return shard, worker

    def __delitem__(self, ticket: Ticket) -> None:
        self.pop(ticket)


@dataclass
class _Watch:
    """One worker's liveness as the scheduler sees it, on the scheduler's clock."""

    since: float  # when its progress last moved, or it last was idle
    beat: Heartbeat | None = None  # its latest answer; None: none since it was started


@dataclass
class _State:
    queue: deque[Shard]
    in_flight: _InFlight  # ticket -> (shard, worker)
    attempts: dict[str, int] = field(default_factory=dict)  # charged tries per shard
    free_requeues: dict[str, int] = field(default_factory=dict)  # uncharged re-dispatches per shard
    suspects: set[str] = field(default_factory=set)  # on a worker that died next to another shard
    failed_starts: int = 0  # workers that failed to start since the last finished shard
    failed: dict[str, str] = field(default_factory=dict)
    deadline: float | None = None  # set once a stop is requested
    watches: dict[int, _Watch] = field(default_factory=dict)  # worker -> its liveness
    stalls_checked: float = float("-inf")  # when stalled workers were last looked for
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=DURATIONS_KEPT))  # of finished shards
    finished: int = 0  # shards finished (durations noted)
    no_copies: set[str] = field(default_factory=set)  # shards a copy of which failed on a live worker
    copies_started: int = 0  # second copies of tail shards (speculation)
    copies_cancelled: int = 0  # copies no longer waited for: the other copy finished first


class _TailCopies:
    """The scheduler's speculative tail: second copies of the shards expected to end last, on
    idle workers, the first copy to finish winning (a part of `Scheduler`)."""

    state: _State
    pool: WorkerPool
    rules: Rules
    clock: Callable[[], float]
    echo: Callable[[str], None]
    _pace: dict[int, float]  # worker -> its last shard's duration over the median
    _median: tuple[int, float]  # (finished shards counted, their median duration)

    def _speculate(self) -> None:
        """Give idle workers, fastest first, second copies of the running shards expected to end
        last, while a copy started now is expected to end sooner than the shard. Expected ends: a shard runs for the
        median duration of finished shards times its worker's pace (its last shard's duration
        over the median), one that has run longer than that for as long again as it has run; a
        shard waiting behind another on its worker starts when that one ends. A copy is never
        charged as an attempt: it carries the attempt number of the first."""
        s = self.state
        median = self._median_duration()
        now = self.clock()
        if median is None or now < self._next_speculation:
            return
        self._next_speculation = now + median * SPECULATE_EVERY
        # known paces first, fastest first; a fresh worker's pace is unknown (taken as 1)
        idle = sorted((w not in self._pace, self._pace.get(w, 1.0), w)
                      for w in range(self.pool.size) if w not in s.in_flight.on_worker)
        ends = sorted(((end, ticket) for ticket, end in self._expected_ends(now, median)), reverse=True)
        for (end, ticket), (_, pace, worker) in zip(ends, idle):  # the fastest idle worker for the latest shard
            if end <= now + median * pace * (1 + SPECULATE_MARGIN):
                break
            shard, _ = s.in_flight[ticket]
            copy = self.pool.submit(worker, shard, s.attempts.get(shard.name, 0) + 1)
            s.in_flight[copy] = (shard, worker)
            s.copies_started += 1

    def _expected_ends(self, now: float, median: float) -> list[tuple[Ticket, float]]:
        """(a ticket, expected end) of each shard that may get another copy: fewer than
        MAX_COPIES running, none failed. A shard with two copies ends with the sooner."""
        s = self.state
        ends: dict[str, tuple[float, Ticket]] = {}
        for worker, tickets in s.in_flight.on_worker.items():
            end, expected = now, median * self._pace.get(worker, 1.0)
            for ticket in tickets:
                started = s.in_flight.started[ticket]
                if started is None:
                    end += expected
                else:
                    ran = now - started
                    end = started + (expected if ran <= expected else 2 * ran)
                name = s.in_flight[ticket][0].name
                if name not in ends or end < ends[name][0]:
                    ends[name] = (end, ticket)
        return [(ticket, end) for name, (end, ticket) in ends.items()
                if len(s.in_flight.of_shard[name]) < MAX_COPIES and name not in s.no_copies]

    def _median_duration(self) -> float | None:
        s = self.state
        if not s.durations:
            return None
        if self._median[0] != s.finished:
            self._median = (s.finished, statistics.median(s.durations))
        return self._median[1]

    def _settle_copies(self, ticket: Ticket, outcome: Outcome) -> bool:
        """Before `_handle`: a finished shard's duration is noted and its other copy, if any, is
        cancelled (neither a failure nor retried). A copy that ended otherwise while another copy
        runs is dropped, uncharged, its worker replaced if it died; True when that settled it."""
        s = self.state
        shard, worker = s.in_flight[ticket]
        started = s.in_flight.started[ticket]
        others = s.in_flight.of_shard[shard.name] - {ticket}
        if isinstance(outcome, Finished):
            if started is not None:
                s.durations.append(self.clock() - started)
                s.finished += 1
                self._pace[worker] = s.durations[-1] / (self._median_duration() or 1.0)
            for other in others:
                s.in_flight.pop(other)
                s.copies_cancelled += 1
                cancel = getattr(self.pool, "cancel", None)
                if cancel is not None:
                    cancel(other)
            return False
        if not others:
            return False
        s.in_flight.pop(ticket)
        if isinstance(outcome, ShardFailed):
            s.no_copies.add(shard.name)
        if isinstance(outcome, (WorkerDied, FailedToStart)):
            self._drop_worker(worker)
            self._replace(worker)
        return True



class _StallWatch:
    """The scheduler's watch on hung workers: heartbeats taken in, a busy worker without progress
    for its stall timeout replaced (a part of `Scheduler`)."""

    state: _State
    pool: WorkerPool
    rules: Rules
    clock: Callable[[], float]
    echo: Callable[[str], None]

    def _watch(self, worker: int) -> _Watch:
        return self.state.watches.setdefault(worker, _Watch(self.clock()))

    def _check_stalls(self) -> None:
        """Take in the workers' heartbeats; replace a busy worker whose progress has not moved
        for its stall timeout (a frozen worker answers nothing; a wedged one answers the same).
        Every STALL_CHECK_S at most (a sixtieth of a shorter stall_timeout), over busy workers
        only: at a thousand workers the loop comes here after every outcome."""
        s = self.state
        now = self.clock()
        timeout = self.rules.stall_timeout
        if now - s.stalls_checked < (STALL_CHECK_S if timeout is None else min(STALL_CHECK_S, timeout / 60)):
            return
        s.stalls_checked = now
        for worker, beat in self.pool.heartbeats().items():
            watch = self._watch(worker)
            if watch.beat is None or beat.loading or beat.progress != watch.beat.progress:
                watch.since = now
            watch.beat = beat
        for worker, tickets in list(s.in_flight.on_worker.items()):
            watch = self._watch(worker)
            busy_since = s.in_flight.started.get(next(iter(tickets)))  # an idle worker makes no progress
            quiet = now - max(watch.since, now if busy_since is None else busy_since)
            limit = stall_timeout_for(self.rules, watch.beat.slowest_batch_s if watch.beat else 0.0)
            if watch.beat is None:  # not started yet, as far as we know: Ray may still be setting it up
                limit = max(limit, START_TIMEOUT_S)
            if quiet > limit:
                self._stalled(worker, quiet)

    def _stalled(self, worker: int, seconds: float) -> None:
        """Kill and replace a stalled worker; its shards run again. One that ran alone is charged
        an attempt (it may be what wedges the device); two that ran side by side become suspects,
        free of charge, as when a worker dies. A worker that never answered failed to start."""
        s = self.state
        beat = self._watch(worker).beat
        mine = sorted(((t, s.in_flight[t][0]) for t in s.in_flight.on_worker[worker]),
                      key=lambda item: item[1].name != (beat.shard if beat else None))  # its latest batch's first
        ticket, shard = mine[0]
        who = beat.worker if beat else "no answer since it started"
        beside = f" (shard {', '.join(o.name for _, o in mine[1:])} beside it)" if mine[1:] else ""
        self.echo(f"worker {worker} ({who}) made no progress for {seconds:.0f}s on shard {shard.name}{beside}; "
                  f"replacing it and retrying {'both' if mine[1:] else 'the shard'}")
        reason = f"worker {who} made no progress for {seconds:.0f}s"
        del s.in_flight[ticket]
        others = self._drop_worker(worker)
        self._replace(worker)
        if shard.name in s.in_flight.of_shard:  # another copy of it runs on: that one finishes it
            return
        if beat is None:
            s.failed_starts += 1
            if s.failed_starts > self.pool.size * self.rules.max_attempts:
                raise WorkersCannotStart(start_failure_message(reason))
            s.queue.appendleft(shard)
            return
        if others:
            s.suspects.update([shard.name, *(o.name for o in others)])
        self._retry(shard, reason, charged=not others, quiet=True)

    def _replace(self, worker: int) -> None:
        """A fresh worker in its place, watched from now."""
        self.pool.replace(worker)
        self.state.watches[worker] = _Watch(self.clock())



class Scheduler(_TailCopies, _StallWatch):
    """Runs `shards` on `pool` until each finished or was given up, or a stop ends the run.

    `on_result` gets each finished shard's result (the worker's return value); `on_tick` gets
    (queued, in flight, workers) after every wait; `echo` gets the lines an operator reads.
    """

    def __init__(
        self,
        pool: WorkerPool,
        shards: Sequence[Shard],
        rules: Rules,
        on_result: Callable[[Any], None] = lambda result: None,
        on_tick: Callable[[int, int, int], None] = lambda queued, in_flight, workers: None,
        echo: Callable[[str], None] = print,
        stop: StopRequest | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.rules = rules
        self.on_result = on_result
        self.on_tick = on_tick
        self.echo = echo
        self.stop = stop or StopRequest()
        self.clock = clock
        self.state = _State(queue=deque(shards), in_flight=_InFlight(clock, pool.size, rules.in_flight_per_worker))
        self._draining: set[int] = set()  # workers left to empty so that a queued suspect can run alone
        self._next_speculation = 0.0  # clock time of the next look for tail shards to copy
        self._pace: dict[int, float] = {}  # worker -> its last shard's duration over the median
        self._median: tuple[int, float] = (0, 0.0)  # (finished shards counted, their median duration)

    def run(self) -> Finish:
        """Dispatch, wait, handle outcomes, until done or stopped; raises WorkersCannotStart."""
        s = self.state
        while s.queue or s.in_flight:
            if self.stop.requested and s.deadline is None:
                s.deadline = self.clock() + self.rules.grace_period
                self.echo(f"stopping: no new shards; waiting up to {self.rules.grace_period:.0f}s "
                          f"for {len(s.in_flight)} in flight")
            if s.deadline is not None and (self.clock() > s.deadline or not s.in_flight):
                return Finish(dict(s.failed), stopped=True)
            if s.deadline is None:
                self._dispatch()
            for ticket, outcome in self.pool.wait(list(s.in_flight), WAIT_S):
                if ticket in s.in_flight and not self._settle_copies(ticket, outcome):
                    self._handle(ticket, outcome)  # (not dropped with its dead worker meanwhile)
            self._check_stalls()
            self.on_tick(len(s.queue), len(s.in_flight), self.pool.size)
        return Finish(dict(s.failed), stopped=False)

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self) -> None:
        """Fill each worker up to `in_flight_per_worker` shards; a suspect shard runs alone on a
        worker. With nothing left to start, idle workers run second copies of tail shards."""
        s = self.state
        plain_left = True  # whether the queue may still hold a shard that is not a suspect
        waiting = sum(1 for name in s.suspects if name not in s.in_flight.of_shard) if s.queue else 0
        for worker in sorted(s.in_flight.open) if s.queue else ():
            if not s.queue:
                break
            mine = [s.in_flight[t][0] for t in s.in_flight.on_worker.get(worker, ())]
            if any(shard.name in s.suspects for shard in mine) or (mine and self._drains_for(worker, waiting)):
                continue
            self._draining.discard(worker)
            while s.queue and len(mine) < self.rules.in_flight_per_worker:
                if not mine:  # an empty worker: the first queued suspect, else the head of the queue
                    position = next((k for k, shard in enumerate(s.queue) if shard.name in s.suspects), 0) \
                        if waiting else 0
                else:
                    position = next((k for k, shard in enumerate(s.queue) if shard.name not in s.suspects),
                                    None) if plain_left else None
                if position is None:
                    plain_left = False
                    break
                shard = s.queue[position]
                del s.queue[position]
                ticket = self.pool.submit(worker, shard, s.attempts.get(shard.name, 0) + 1)
                s.in_flight[ticket] = (shard, worker)
                mine.append(shard)
                if shard.name in s.suspects:
                    waiting -= 1
                    break
        if self.rules.speculate and not s.queue and len(s.in_flight.on_worker) < self.pool.size:
            self._speculate()

    def _drains_for(self, worker: int, waiting: int) -> bool:
        """Whether `worker` (busy) takes nothing new, so that it empties for one of the `waiting`
        queued suspects: one worker drains per suspect, else suspects would wait for a worker
        that happens to be empty, which at scale is the tail of the job."""
        if not waiting:
            self._draining.clear()
        elif worker not in self._draining and len(self._draining) < waiting:
            self._draining.add(worker)
        return worker in self._draining

    # ------------------------------------------------------------------ outcomes
    def _handle(self, ticket: Ticket, outcome: Outcome) -> None:
        s = self.state
        shard, worker = s.in_flight.pop(ticket)
        if isinstance(outcome, Finished):
            s.failed_starts = 0
            self._watch(worker).since = self.clock()
            s.suspects.discard(shard.name)
            self.on_result(outcome.result)
        elif isinstance(outcome, (ShardFailed, Unavailable)):
            self._retry(shard, outcome.reason, charged=isinstance(outcome, ShardFailed))
        elif isinstance(outcome, FailedToStart):
            s.failed_starts += 1
            if s.failed_starts > self.pool.size * self.rules.max_attempts:
                raise WorkersCannotStart(start_failure_message(outcome.reason))
            s.queue.appendleft(shard)
            self._drop_worker(worker)
            self._replace(worker)
        elif isinstance(outcome, WorkerDied):
            # A worker that ran one shard alone died of it: charge that shard. A worker that ran
            # two leaves both as suspects, which then run alone until the culprit shows.
            others = self._drop_worker(worker)
            if others:
                s.suspects.update([shard.name, *(o.name for o in others)])
            self._replace(worker)
            self._retry(shard, outcome.reason, charged=not others)
        else:
            raise TypeError(f"not an outcome: {outcome!r}")

    def _drop_worker(self, worker: int) -> list[Shard]:
        """Shards still in flight on a worker that died: queued again (first), not charged."""
        s = self.state
        dropped = []
        self._pace.pop(worker, None)  # a fresh worker takes its place
        for ticket in list(s.in_flight.on_worker.get(worker, ())):
            shard, _ = s.in_flight.pop(ticket)
            if shard.name in s.in_flight.of_shard:  # its other copy runs on
                continue
            s.free_requeues[shard.name] = s.free_requeues.get(shard.name, 0) + 1
            s.queue.appendleft(shard)
            dropped.append(shard)
        return dropped

    def _retry(self, shard: Shard, reason: str, charged: bool, quiet: bool = False) -> None:
        """Charge (or not) an attempt, then queue the shard again (`quiet`: without a line, the
        caller said why) or give it up."""
        s = self.state
        name = shard.name
        if charged or s.free_requeues.get(name, 0) >= self.rules.max_free_requeues:
            s.attempts[name] = s.attempts.get(name, 0) + 1
        else:
            s.free_requeues[name] = s.free_requeues.get(name, 0) + 1
        if s.attempts.get(name, 0) >= self.rules.max_attempts:
            s.failed[name] = reason
            self.echo(f"shard {name} failed {s.attempts[name]} times, giving up: {reason}")
        else:
            if not quiet:
                self.echo(f"shard {name} attempt {s.attempts.get(name, 0)} failed ({reason}); retrying")
            s.queue.append(shard)
