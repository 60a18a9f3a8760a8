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

import heapq
import itertools
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
DURATIONS_KEPT = 1000  # latest finished shards' seconds per row the tail's median is taken over
SPECULATE_MARGIN = 0.1  # a second copy must be expected to end this share of a shard's time sooner
MAX_COPIES = 3  # running copies of one shard at most (the first and two more)
SLOW_PACE = 1.5  # a worker this many times slower than the median takes the smallest shards queued
LOOK_BACK = 1000  # a slow worker looks this far back in the queue for a small shard
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
        self.rows = 0  # rows of the shards in flight (a shard's copies each count)

    def __setitem__(self, ticket: Ticket, value: tuple[Shard, int]) -> None:
        if ticket in self:
            self.pop(ticket)
        shard, worker = value
        super().__setitem__(ticket, value)
        self.rows += shard.num_rows
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
        self.rows -= shard.num_rows
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


class _Queue(deque):
    """The shards waiting to run, with their rows counted (read at every dispatch)."""

    def __init__(self, shards: Sequence[Shard] = ()) -> None:
        super().__init__(shards)
        self.rows = sum(shard.num_rows for shard in shards)

    def append(self, shard: Shard) -> None:
        super().append(shard)
        self.rows += shard.num_rows

    def appendleft(self, shard: Shard) -> None:
        super().appendleft(shard)
        self.rows += shard.num_rows

    def __delitem__(self, index: int) -> None:  # type: ignore[override]
        self.rows -= self[index].num_rows
        super().__delitem__(index)


@dataclass
class _Watch:
    """One worker's liveness as the scheduler sees it, on the scheduler's clock."""

    since: float  # when its progress last moved, or it last was idle
    beat: Heartbeat | None = None  # its latest answer; None: none since it was started


@dataclass
class _State:
    queue: _Queue
    in_flight: _InFlight  # ticket -> (shard, worker)
    attempts: dict[str, int] = field(default_factory=dict)  # charged tries per shard
    free_requeues: dict[str, int] = field(default_factory=dict)  # uncharged re-dispatches per shard
    suspects: set[str] = field(default_factory=set)  # on a worker that died next to another shard
    failed_starts: int = 0  # workers that failed to start since the last finished shard
    failed: dict[str, str] = field(default_factory=dict)
    deadline: float | None = None  # set once a stop is requested
    watches: dict[int, _Watch] = field(default_factory=dict)  # worker -> its liveness
    stalls_checked: float = float("-inf")  # when stalled workers were last looked for
    row_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=DURATIONS_KEPT))  # of finished shards
    finished: int = 0  # shards finished (their seconds per row noted)
    no_copies: set[str] = field(default_factory=set)  # shards a copy of which failed on a live worker
    copies_started: int = 0  # second copies of tail shards (speculation)
    copies_cancelled: int = 0  # copies no longer waited for: the other copy finished first


class _TailCopies:
    """The scheduler's tail (a part of `Scheduler`): a shard that a worker would end after a
    worker of median pace taking it last is passed over for the queue's last (smallest) shard;
    with nothing left to start, idle workers run second copies of the shards expected to end
    last, the first copy to finish winning.

    Expectations come from finished shards: seconds per row (the median of the latest
    DURATIONS_KEPT) times a shard's rows times its worker's pace (its shards' seconds per row
    over the median, each new one averaged with the pace before; 1 for a worker that has
    finished none)."""

    state: _State
    pool: WorkerPool
    rules: Rules
    clock: Callable[[], float]
    echo: Callable[[str], None]
    _pace: dict[int, float]  # worker -> its shards' seconds per row over the median (halved in each time)
    _median: tuple[int, float, float]  # (finished shards counted, their median seconds per row, slowest pace)
    _last_rows: int  # rows of the latest finished shard
    _draining: set[int]  # workers left to empty so that a queued suspect can run alone

    def _position_for(self, worker: int, position: int) -> int:
        """The queue position `worker` takes instead of `position`: a slow worker (`_slow`) takes
        the last queued shard smaller than that one (no suspect, among the last LOOK_BACK), one
        of the tail's smallest pieces (`run/tail.py`), so that it never holds a long shard at
        the end."""
        s = self.state
        if not self._slow(worker):
            return position
        rows = s.queue[position].num_rows
        back = itertools.islice(reversed(s.queue), LOOK_BACK)  # retries queued last come before the pieces
        k = next((k for k, shard in enumerate(back) if shard.num_rows < rows and shard.name not in s.suspects), None)
        return position if k is None else len(s.queue) - 1 - k

    def _ending(self) -> bool:
        """Whether the queue holds less than one shard per worker (of the latest finished size)."""
        return self._row_seconds() is not None and self.state.queue.rows < self._last_rows * self.pool.size

    def _loading(self, worker: int) -> bool:
        """Whether `worker` last said that its model is still loading (and has finished no
        shard since: heartbeats are taken every few seconds only)."""
        watch = self.state.watches.get(worker)
        return worker not in self._pace and watch is not None and watch.beat is not None and watch.beat.loading

    def _slow(self, worker: int) -> bool:
        """Whether `worker` may be slow: its pace above SLOW_PACE; a worker that
        has finished nothing yet is taken to be as slow as the slowest recent shard."""
        return self._row_seconds() is not None and self._pace.get(worker, self._median[2]) > SLOW_PACE

    def _speculate(self) -> None:
        """Second copies of the running shards expected to end last, on the workers with room
        that would end them soonest, while a copy is expected to end sooner than its shard
        (by SPECULATE_MARGIN of its time). While shards are queued, only a straggler gets one: a
        shard expected to end after the work queued and in flight is done by the whole pool at
        the median pace. A shard runs for its expected time, one that has run longer than that
        for as long again as it has run; a shard waiting behind another on its worker starts
        when that one ends. A copy is never charged as an attempt: it carries the attempt number
        of the first. Slow workers and workers emptied for a suspect get no copy."""
        s = self.state
        rate = self._row_seconds()
        now = self.clock()
        if rate is None or now < self._next_speculation:
            return
        self._next_speculation = now + rate * self._last_rows * SPECULATE_EVERY
        drained = now + (s.queue.rows + s.in_flight.rows) * rate / self.pool.size if s.queue else now
        late = sorted(((end, ticket) for ticket, end in self._expected_ends(now, rate) if end > drained),
                      key=lambda item: item[0], reverse=True)  # (tickets need not compare)
        if not late:
            return
        ending = self._ending()
        room = [(self._worker_end(w, now, rate)[0], w not in self._pace, self._pace.get(w, 1.0), w)
                for w in s.in_flight.open if self._may_copy_on(w) and not (ending and self._loading(w))]
        heapq.heapify(room)
        for end, ticket in late:
            if not room:
                break
            shard, _ = s.in_flight[ticket]
            free, unknown, pace, worker = room[0]  # the worker free soonest
            copy_end = free + shard.num_rows * rate * pace
            if end <= copy_end + shard.num_rows * rate * pace * SPECULATE_MARGIN:
                continue
            copy = self.pool.submit(worker, shard, s.attempts.get(shard.name, 0) + 1)
            s.in_flight[copy] = (shard, worker)
            s.copies_started += 1
            if worker in s.in_flight.open:
                heapq.heapreplace(room, (copy_end, unknown, pace, worker))
            else:
                heapq.heappop(room)

    def _may_copy_on(self, worker: int) -> bool:
        """Whether `worker` may run a copy: not slow, not emptied for a suspect, running none."""
        s = self.state
        return (self._pace.get(worker, 1.0) <= SLOW_PACE and worker not in self._draining
                and not any(s.in_flight[t][0].name in s.suspects for t in s.in_flight.on_worker.get(worker, ())))

    def _worker_end(self, worker: int, now: float, rate: float) -> tuple[float, dict[Ticket, float]]:
        """When `worker` is expected to have ended what it holds, and each of its tickets' end."""
        s = self.state
        end, pace, ends = now, self._pace.get(worker, 1.0), {}
        for ticket in s.in_flight.on_worker.get(worker, ()):
            expected = s.in_flight[ticket][0].num_rows * rate * pace
            started = s.in_flight.started[ticket]
            if started is None:
                end += expected
            else:
                ran = now - started
                end = started + (expected if ran <= expected else 2 * ran)
            ends[ticket] = end
        return end, ends

    def _expected_ends(self, now: float, rate: float) -> list[tuple[Ticket, float]]:
        """(a ticket, expected end) of each shard that may get another copy: fewer than
        MAX_COPIES running, none failed. A shard with two copies ends with the sooner."""
        s = self.state
        ends: dict[str, tuple[float, Ticket]] = {}
        ending = self._ending()
        for worker in s.in_flight.on_worker:
            loading = ending and self._loading(worker)  # when it starts is anyone's guess
            for ticket, end in self._worker_end(worker, now, rate)[1].items():
                end = float("inf") if loading else end
                name = s.in_flight[ticket][0].name
                if name not in ends or end < ends[name][0]:
                    ends[name] = (end, ticket)
        return [(ticket, end) for name, (end, ticket) in ends.items()
                if len(s.in_flight.of_shard[name]) < MAX_COPIES and name not in s.no_copies]

    def _row_seconds(self) -> float | None:
        """The median seconds per row of the latest finished shards; None before the first."""
        s = self.state
        if not s.row_seconds:
            return None
        if self._median[0] != s.finished:
            median = statistics.median(s.row_seconds)
            self._median = (s.finished, median, max(s.row_seconds) / median if median > 0 else 1.0)
        return self._median[1]

    def _settle_copies(self, ticket: Ticket, outcome: Outcome) -> bool:
        """Before `_handle`: a finished shard's time is noted and its other copy, if any, is
        cancelled (neither a failure nor retried). A copy that ended otherwise while another copy
        runs is dropped, uncharged, its worker replaced if it died; True when that settled it."""
        s = self.state
        shard, worker = s.in_flight[ticket]
        started = s.in_flight.started[ticket]
        others = s.in_flight.of_shard[shard.name] - {ticket}
        if isinstance(outcome, Finished):
            if started is not None and shard.num_rows > 0:
                s.row_seconds.append((self.clock() - started) / shard.num_rows)
                s.finished += 1
                self._last_rows = shard.num_rows
                pace = s.row_seconds[-1] / (self._row_seconds() or 1.0)
                self._pace[worker] = (self._pace[worker] + pace) / 2 if worker in self._pace else pace
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
        self.state = _State(queue=_Queue(shards), in_flight=_InFlight(clock, pool.size, rules.in_flight_per_worker))
        self._draining: set[int] = set()  # workers left to empty so that a queued suspect can run alone
        self._next_speculation = 0.0  # clock time of the next look for tail shards to copy
        self._pace: dict[int, float] = {}  # worker -> its shards' seconds per row over the median
        self._median = (0, 0.0, 1.0)  # (finished shards counted, their median seconds per row, slowest pace)
        self._last_rows = 0  # rows of the latest finished shard

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
        worker, not a slow one while another can. Stragglers get second copies (`_speculate`)."""
        s = self.state
        if self.rules.speculate and s.in_flight.open:  # first: a straggler's copy goes before new shards
            self._speculate()
        plain_left = True  # whether the queue may still hold a shard that is not a suspect
        ending = self._ending()
        waiting = sum(1 for name in s.suspects if name not in s.in_flight.of_shard) if s.queue else 0
        for worker in sorted(s.in_flight.open) if s.queue else ():
            if not s.queue:
                break
            mine = [s.in_flight[t][0] for t in s.in_flight.on_worker.get(worker, ())]
            if any(shard.name in s.suspects for shard in mine) or (mine and self._drains_for(worker, waiting)):
                continue
            if ending and self._loading(worker):  # it would start late: others take the last shards
                continue
            self._draining.discard(worker)
            while s.queue and len(mine) < self.rules.in_flight_per_worker:
                if not mine and not waiting:
                    position = 0
                elif not mine and not self._slow(worker):  # an empty worker: the first queued suspect
                    position = next((k for k, shard in enumerate(s.queue) if shard.name in s.suspects), 0)
                else:  # (a slow worker runs a suspect only when nothing else is left)
                    position = next((k for k, shard in enumerate(s.queue) if shard.name not in s.suspects),
                                    None) if plain_left else None
                    if position is None and not mine:
                        position = next((k for k, shard in enumerate(s.queue) if shard.name in s.suspects), 0)
                if position is None:
                    plain_left = False
                    break
                if s.queue[position].name not in s.suspects:
                    position = self._position_for(worker, position)
                shard = s.queue[position]
                del s.queue[position]
                ticket = self.pool.submit(worker, shard, s.attempts.get(shard.name, 0) + 1)
                s.in_flight[ticket] = (shard, worker)
                mine.append(shard)
                if shard.name in s.suspects:
                    waiting -= 1
                    break

    def _drains_for(self, worker: int, waiting: int) -> bool:
        """Whether `worker` (busy) takes nothing new, so that it empties for one of the `waiting`
        queued suspects: one worker drains per suspect, else suspects would wait for a worker
        that happens to be empty, which at scale is the tail of the job."""
        if not waiting:
            self._draining.clear()
        elif worker not in self._draining and len(self._draining) < waiting and not self._slow(worker):
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
            s.queue.appendleft(shard)  # first: at the back it would run last, after the tail's small shards
