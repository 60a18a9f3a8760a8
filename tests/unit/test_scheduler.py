"""The scheduling policy against a fake pool, without Ray: retries, suspects, give-up, stop,
start-up failures, stalled workers.

The fake pool runs no code: each submitted shard ends, after a time on a fake clock, with the
outcome a test's script gives it (or never). Its workers are numbered slots holding actors;
an actor that dies fails every shard it holds, as a Ray actor does. Each actor answers
heartbeats whose progress moves with the clock, until a test freezes it (no answer) or wedges
it (answers, no progress).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import pytest

from zimage_batch.run.heartbeat import Heartbeat
from zimage_batch.run.plan import Shard
from zimage_batch.run.scheduler import (
    STALL_CHECK_S,
    START_TIMEOUT_S,
    FailedToStart,
    Finished,
    Outcome,
    Rules,
    Scheduler,
    ShardFailed,
    StopRequest,
    Unavailable,
    WorkerDied,
    WorkersCannotStart,
    stall_timeout_for,
    start_failure_message,
)


@dataclass
class Run:
    ticket: int
    shard: Shard
    attempt: int
    worker: int
    actor: int
    outcome: Outcome | None  # None: never ends
    ready_at: float


Script = Callable[[Shard, int, int], "tuple[Outcome | None, float]"]  # (shard, attempt, actor) -> (outcome, duration)


def finishes(shard: Shard, attempt: int, actor: int) -> tuple[Outcome | None, float]:
    return Finished({"shard": shard.name, "rows": shard.num_rows, "error": 0}), 1.0


class FakePool:
    """Implements the scheduler's WorkerPool Protocol on a fake clock."""

    def __init__(self, size: int, script: Script = finishes, start_fails: Callable[[int], bool] = lambda actor: False,
                 frozen_at: Callable[[int], float] = lambda actor: float("inf"),
                 wedged_at: Callable[[int], float] = lambda actor: float("inf"),
                 loading_until: float = 0.0, batch_s: float = 1.0):
        """From `frozen_at(actor)` on, an actor answers no heartbeat; from `wedged_at(actor)` on,
        its progress stays put; until `loading_until` every actor says it is loading its model."""
        self.size = size
        self.script = script
        self.start_fails = start_fails
        self.frozen_at, self.wedged_at = frozen_at, wedged_at
        self.loading_until, self.batch_s = loading_until, batch_s
        self.now = 0.0
        self.actors = list(range(size))
        self.next_actor = size
        self.runs: dict[int, Run] = {}  # submitted and not yet reported or forgotten
        self.submitted: list[Run] = []
        self.replaced: list[int] = []
        self.crowding: list[list[str]] = []  # at each submit: the shards then open on that worker

    def submit(self, worker: int, shard: Shard, attempt: int) -> int:
        actor = self.actors[worker]
        if self.start_fails(actor):
            outcome, duration = FailedToStart("ModelSourceError: cannot fetch 'Org/Missing' from the hub"), 0.5
        else:
            outcome, duration = self.script(shard, attempt, actor)
        run = Run(len(self.submitted), shard, attempt, worker, actor, outcome,
                  self.now + duration if outcome is not None else float("inf"))
        self.runs[run.ticket] = run
        self.submitted.append(run)
        self.crowding.append([r.shard.name for r in self.runs.values() if r.actor == actor])
        return run.ticket

    def wait(self, tickets, timeout):
        open_runs = [self.runs[t] for t in tickets if t in self.runs]
        due = min((r.ready_at for r in open_runs), default=float("inf"))
        if due > self.now:
            self.now = min(due, self.now + timeout)
        ready = sorted((r for r in open_runs if r.ready_at <= self.now), key=lambda r: (r.ready_at, r.ticket))
        if not ready:
            return []
        run = self.runs.pop(ready[0].ticket)
        if isinstance(run.outcome, (WorkerDied, FailedToStart)):  # the actor is gone: so is all it held
            for other in self.runs.values():
                if other.actor == run.actor:
                    other.outcome, other.ready_at = run.outcome, self.now
        return [(run.ticket, run.outcome)]

    def replace(self, worker: int) -> None:
        gone = self.actors[worker]
        for ticket in [t for t, r in self.runs.items() if r.actor == gone]:
            del self.runs[ticket]
        self.actors[worker] = self.next_actor
        self.next_actor += 1
        self.replaced.append(worker)

    def heartbeats(self) -> dict[int, Heartbeat]:
        beats = {}
        for worker, actor in enumerate(self.actors):
            if self.now >= self.frozen_at(actor):
                continue
            mine = [r.shard.name for r in self.runs.values() if r.actor == actor]
            progress = int(min(self.now, self.wedged_at(actor)))  # moves each second, until wedged
            beats[worker] = Heartbeat(f"host:{1000 + actor}", progress, self.now < self.loading_until,
                                      self.batch_s, mine[-1] if mine else None)
        return beats

    def attempts_of(self, name: str) -> list[int]:
        return [r.attempt for r in self.submitted if r.shard.name == name]


def shards(n: int) -> list[Shard]:
    return [Shard(f"s{i}", "m.parquet", i * 10, i * 10 + 10) for i in range(n)]


def schedule(pool: FakePool, todo: list[Shard], rules: Rules = Rules(), stop: StopRequest | None = None,
             on_result: Callable | None = None) -> tuple[object, list, list[str]]:
    results: list = []
    lines: list[str] = []
    scheduler = Scheduler(pool, todo, rules, on_result=on_result or results.append, echo=lines.append,
                          stop=stop, clock=lambda: pool.now)
    return scheduler.run(), results, lines


def test_every_shard_runs_once_with_two_in_flight_per_worker():
    pool = FakePool(size=3)
    finish, results, lines = schedule(pool, shards(10))
    assert finish.failed == {} and not finish.stopped and lines == []
    assert sorted(r["shard"] for r in results) == sorted(s.name for s in shards(10))
    assert len(pool.submitted) == 10 and all(r.attempt == 1 for r in pool.submitted)
    assert max(len(c) for c in pool.crowding) == 2  # two per worker, never three
    assert pool.replaced == []


def test_a_failed_shard_is_retried_with_its_attempt_number():
    def script(shard, attempt, actor):
        if shard.name == "s1" and attempt == 1:
            return ShardFailed("ValueError: flaky storage"), 1.0
        return finishes(shard, attempt, actor)

    pool = FakePool(size=2, script=script)
    finish, results, lines = schedule(pool, shards(4))
    assert finish.failed == {} and len(results) == 4
    assert pool.attempts_of("s1") == [1, 2]
    assert lines == ["shard s1 attempt 1 failed (ValueError: flaky storage); retrying"]
    assert pool.replaced == []  # the worker was fine: the shard's own code raised


def test_a_shard_that_always_fails_is_given_up_after_max_attempts():
    def script(shard, attempt, actor):
        return (ShardFailed("RuntimeError: bad row") if shard.name == "s2" else Finished({"shard": shard.name})), 1.0

    pool = FakePool(size=2, script=script)
    finish, results, lines = schedule(pool, shards(5), Rules(max_attempts=3))
    assert finish.failed == {"s2": "RuntimeError: bad row"} and not finish.stopped
    assert pool.attempts_of("s2") == [1, 2, 3]
    assert sorted(r["shard"] for r in results) == ["s0", "s1", "s3", "s4"]
    assert lines[-1] == "shard s2 failed 3 times, giving up: RuntimeError: bad row"


def test_a_worker_that_dies_alone_with_its_shard_charges_that_shard_and_is_replaced():
    def script(shard, attempt, actor):
        if shard.name == "s0" and attempt == 1:
            return WorkerDied("ActorDiedError: SIGKILL"), 1.0
        return finishes(shard, attempt, actor)

    pool = FakePool(size=1, script=script)
    finish, results, _ = schedule(pool, shards(1))
    assert finish.failed == {} and pool.attempts_of("s0") == [1, 2] and pool.replaced == [0]


def test_a_crashing_shard_next_to_an_innocent_one_is_isolated_and_only_it_is_charged():
    """s0 kills any worker it runs on; s1 shares its worker at first and is still running when
    s0 kills it. Neither is charged for that death; both become suspects and run alone; only s0
    is charged from then on, and gives up after max_attempts."""

    def script(shard, attempt, actor):
        if shard.name == "s0":
            return WorkerDied("ActorDiedError: the actor died (SIGSEGV)"), 2.0
        return Finished({"shard": shard.name}), 3.0 if shard.name == "s1" else 1.0

    pool = FakePool(size=2, script=script)
    finish, results, lines = schedule(pool, shards(16), Rules(max_attempts=3))
    assert finish.failed == {"s0": "ActorDiedError: the actor died (SIGSEGV)"}
    assert sorted(r["shard"] for r in results) == sorted(f"s{i}" for i in range(1, 16))
    first, second = pool.submitted[:2]
    assert (first.shard.name, second.shard.name) == ("s0", "s1") and first.actor == second.actor
    assert pool.attempts_of("s0") == [1, 1, 2, 3]  # the shared death free, then charged each time
    assert all(r.attempt == 1 for r in pool.submitted if r.shard.name != "s0"), "an innocent shard was charged"
    assert pool.attempts_of("s1") == [1, 1]  # rerun once, after the shared death
    after = [(r, crowd) for r, crowd in zip(pool.submitted[2:], pool.crowding[2:]) if r.shard.name in ("s0", "s1")]
    assert len(after) == 4 and all(crowd == [r.shard.name] for r, crowd in after), "a suspect shared its worker"
    assert all(len(crowd) == 1 or not {"s0", "s1"} & set(crowd) for crowd in pool.crowding[2:]), "joined a suspect"
    assert len(pool.replaced) == 1 + 3  # the shared death, then s0's three
    assert lines[0] == "shard s0 attempt 0 failed (ActorDiedError: the actor died (SIGSEGV)); retrying"


def test_a_lost_node_takes_its_workers_and_their_shards_run_again_uncharged():
    """Both workers sat on one node that went away, each running two shards: every shard runs
    again on the replacements and the run completes, nothing charged or given up."""

    def script(shard, attempt, actor):
        if actor in (0, 1):  # the lost node's actors: everything on them dies at t=1.5
            return WorkerDied("ActorDiedError: the node was removed"), 1.5
        return finishes(shard, attempt, actor)

    pool = FakePool(size=2, script=script)
    finish, results, _ = schedule(pool, shards(6), Rules(max_attempts=1))
    assert finish.failed == {} and sorted(r["shard"] for r in results) == [f"s{i}" for i in range(6)]
    assert all(r.attempt == 1 for r in pool.submitted) and sorted(pool.replaced) == [0, 1]


def test_free_requeues_are_capped_then_charged():
    pool = FakePool(size=1, script=lambda s, a, actor: (Unavailable("ActorUnavailableError: network"), 1.0))
    finish, _, _ = schedule(pool, shards(1), Rules(max_attempts=3, max_free_requeues=2))
    assert finish.failed == {"s0": "ActorUnavailableError: network"}
    assert pool.attempts_of("s0") == [1, 1, 1, 2, 3]  # two free reruns, then three charged attempts


def test_an_unavailable_worker_reruns_the_shard_free_of_charge_and_is_kept():
    def script(shard, attempt, actor):
        if shard.name == "s0" and not pool.attempts_of("s0"):  # its first run
            return Unavailable("ActorUnavailableError: connection reset"), 1.0
        return finishes(shard, attempt, actor)

    pool = FakePool(size=1, script=script)
    finish, results, _ = schedule(pool, shards(2), Rules(max_attempts=1))
    assert finish.failed == {} and len(results) == 2
    assert pool.attempts_of("s0") == [1, 1] and pool.replaced == []


def test_stop_request_dispatches_nothing_new_and_waits_for_in_flight_until_the_grace_deadline():
    """After the stop, shards in flight may still finish within the grace period; then the run
    ends as stopped, whatever is left in flight or queued."""
    stop = StopRequest()
    durations = {"s0": 1.0, "s1": 5.0, "s2": 8.0, "s3": 100.0}

    def script(shard, attempt, actor):
        return Finished({"shard": shard.name}), durations.get(shard.name, 1.0)

    pool = FakePool(size=2, script=script)
    results: list = []

    def on_result(result):
        results.append(result)
        if result["shard"] == "s0":
            stop.request()  # at t=1: s1, s2, s3 in flight (s0's slot refilled by s4 is not allowed)

    finish, _, lines = schedule(pool, shards(10), Rules(grace_period=10.0), stop=stop, on_result=on_result)
    assert finish.stopped and finish.failed == {}
    assert [r["shard"] for r in results] == ["s0", "s1", "s2"]  # s3 (100 s) was still running at t=11
    assert [r.shard.name for r in pool.submitted] == ["s0", "s1", "s2", "s3"]  # nothing after the stop
    assert lines == ["stopping: no new shards; waiting up to 10s for 3 in flight"]
    assert 11.0 <= pool.now <= 12.0  # the grace deadline, not s3's end


def test_stop_with_nothing_in_flight_ends_at_once():
    stop = StopRequest()
    stop.request()
    pool = FakePool(size=2)
    finish, results, _ = schedule(pool, shards(3), stop=stop)
    assert finish.stopped and results == [] and pool.submitted == []


def test_stop_request_follows_sigterm_and_a_second_ctrl_c_abandons():
    stop = StopRequest()
    before = signal.getsignal(signal.SIGTERM)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_worker_that_fails_to_start_is_replaced_without_charging_its_shards():
    pool = FakePool(size=2, start_fails=lambda actor: actor == 0)
    finish, results, lines = schedule(pool, shards(4), Rules(max_attempts=1))
    assert finish.failed == {} and len(results) == 4 and lines == []
    assert pool.replaced == [0] and all(r.attempt == 1 for r in pool.submitted)


def test_workers_that_never_start_end_the_run_after_workers_times_max_attempts():
    pool = FakePool(size=2, start_fails=lambda actor: True)
    with pytest.raises(WorkersCannotStart) as caught:
        schedule(pool, shards(4), Rules(max_attempts=3))
    assert len(pool.replaced) == 2 * 3  # the 7th failure in a row ends the run
    assert str(caught.value) == ("workers keep dying before they can start (ModelSourceError: cannot fetch "
                                 "'Org/Missing' from the hub); check that the model loads on the workers' nodes")


def test_a_finished_shard_resets_the_failed_start_count():
    pool = FakePool(size=1, start_fails=lambda actor: actor % 2 == 0)  # every other actor fails to start
    finish, results, _ = schedule(pool, shards(3), Rules(max_attempts=1))
    assert finish.failed == {} and len(results) == 3


@pytest.mark.parametrize("reason, hint", [
    ("ModelSourceError: cannot fetch 'Org/X' from the hub", "check that the model loads on the workers' nodes"),
    ("ActorDiedError: ManifestError: /data/m.parquet: no such file or folder",
     "check that the manifest is readable from the workers' nodes"),
    ("ActorDiedError: StorageError: cannot write to local folder /out", "check that OUTPUT is writable"),
    ("ActorDiedError: ModuleNotFoundError: No module named 'zimage_batch'", "zimage-batch is installed"),
])
def test_the_start_up_hint_follows_the_error(reason, hint):
    message = start_failure_message(reason)
    assert hint in message and message.startswith(f"workers keep dying before they can start ({reason})")
    if "model" not in hint:
        assert "model loads" not in message


def test_the_scheduler_runs_without_ray():
    code = "import sys, zimage_batch.run.scheduler, zimage_batch.run.driver; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------- stalled workers
def never_on_first_actor(shard: Shard, attempt: int, actor: int) -> tuple[Outcome | None, float]:
    """Shards on actor 0 never end (it hangs); on any other actor they finish."""
    return (None, 0.0) if actor == 0 else finishes(shard, attempt, actor)


@pytest.mark.parametrize("fault", ["frozen", "wedged"])
def test_a_stalled_worker_is_replaced_and_its_shard_rerun_as_a_new_attempt(fault):
    """Actor 0 stops at t=1.5 while it runs s0 alone: frozen (SIGSTOP: no heartbeat) or wedged
    (heartbeats, no progress). Once stall_timeout passes without progress it is replaced, in one
    line naming it and the shard; the shard runs again, charged (it ran alone), and the run ends."""
    stops = {"frozen_at" if fault == "frozen" else "wedged_at": lambda actor: 1.5 if actor == 0 else float("inf")}
    pool = FakePool(size=1, script=never_on_first_actor, **stops)
    finish, results, lines = schedule(pool, shards(3), Rules(stall_timeout=30, in_flight_per_worker=1))
    assert finish.failed == {} and sorted(r["shard"] for r in results) == ["s0", "s1", "s2"]
    assert pool.replaced == [0] and pool.attempts_of("s0") == [1, 2]
    assert len(lines) == 1 and lines[0].startswith("worker 0 (host:1000) made no progress for 3")
    assert lines[0].endswith("s on shard s0; replacing it and retrying the shard")
    assert 30 < pool.now - 3.0 < 33, "replaced about stall_timeout after the last progress"


def test_a_stalled_worker_running_two_shards_leaves_both_as_suspects_free_of_charge():
    """Both shards ran beside each other on the wedged worker: neither is charged, each reruns
    alone (as when a worker dies running two), and the line names both."""
    pool = FakePool(size=1, script=never_on_first_actor, wedged_at=lambda actor: 0.5 if actor == 0 else float("inf"))
    finish, results, lines = schedule(pool, shards(3), Rules(stall_timeout=10, max_attempts=1))
    assert finish.failed == {} and len(results) == 3
    assert pool.attempts_of("s0") == [1, 1] and pool.attempts_of("s1") == [1, 1] and pool.replaced == [0]
    assert lines == ["worker 0 (host:1000) made no progress for 11s on shard s1 (shard s0 beside it); "
                     "replacing it and retrying both"]
    reruns = [crowd for r, crowd in zip(pool.submitted, pool.crowding) if r.actor == 1 and r.shard.name in ("s0", "s1")]
    assert sorted(reruns) == [["s0"], ["s1"]], "a suspect shared its worker"


def test_a_shard_that_stalls_every_worker_is_given_up_after_max_attempts():
    def script(shard, attempt, actor):
        return (None, 0.0) if shard.name == "s1" else finishes(shard, attempt, actor)

    pool = FakePool(size=1, script=script, wedged_at=lambda actor: 0.0)
    finish, results, lines = schedule(pool, shards(3), Rules(stall_timeout=5, max_attempts=2, in_flight_per_worker=1))
    assert list(finish.failed) == ["s1"] and "made no progress for" in finish.failed["s1"]
    assert sorted(r["shard"] for r in results) == ["s0", "s2"] and pool.attempts_of("s1") == [1, 2]
    assert len(lines) == 3 and lines[-1].startswith("shard s1 failed 2 times, giving up: worker host:")


def test_the_default_stall_timeout_follows_the_slowest_batch():
    assert stall_timeout_for(Rules(), 0.0) == 300.0 and stall_timeout_for(Rules(), 2.0) == 300.0
    assert stall_timeout_for(Rules(), 45.0) == 450.0  # 10x the slowest batch
    assert stall_timeout_for(Rules(stall_timeout=8), 45.0) == 8.0  # the job's setting wins
    pool = FakePool(size=1, script=never_on_first_actor, frozen_at=lambda actor: 0.5 if actor == 0 else float("inf"),
                    batch_s=60.0)
    finish, results, lines = schedule(pool, shards(1), Rules(in_flight_per_worker=1))
    assert finish.failed == {} and len(results) == 1 and len(lines) == 1
    assert 600 < pool.now - 1.0 < 603 + STALL_CHECK_S, "10 x 60 s batches (looked at every STALL_CHECK_S)"


def test_a_worker_loading_its_model_is_not_stalled_and_one_never_answering_failed_to_start():
    """A model download longer than stall_timeout is progress while the worker answers; a worker
    that never answered is taken for one that did not start: replaced after START_TIMEOUT_S,
    its shards free of charge."""
    pool = FakePool(size=1, loading_until=500.0, wedged_at=lambda actor: 0.0)
    finish, results, lines = schedule(pool, shards(2), Rules(stall_timeout=10))
    assert finish.failed == {} and len(results) == 2 and lines == [] and pool.replaced == []
    pool = FakePool(size=1, script=never_on_first_actor, frozen_at=lambda actor: 0.0 if actor == 0 else float("inf"))
    finish, results, lines = schedule(pool, shards(2), Rules(stall_timeout=10, max_attempts=1))
    assert finish.failed == {} and len(results) == 2 and pool.replaced == [0]
    assert all(r.attempt == 1 for r in pool.submitted)
    assert lines == [f"worker 0 (no answer since it started) made no progress for {START_TIMEOUT_S + 1:.0f}s "
                     "on shard s0 (shard s1 beside it); replacing it and retrying both"]


def slow_actor_zero(shard, attempt, actor):
    """Actor 0 runs ten times slower than the others."""
    return Finished({"shard": shard.name}), 10.0 if actor == 0 else 1.0


def test_idle_workers_run_second_copies_of_the_tail_and_the_first_to_finish_wins():
    """Worker 0 is slow: once the queue is empty, the fast worker copies its shards (the one
    waiting first, then the running one); each shard's result comes once, nothing is charged."""
    pool = FakePool(size=2, script=slow_actor_zero)
    finish, results, lines = schedule(pool, shards(6), Rules(speculate=True))
    assert finish.failed == {} and lines == []
    assert sorted(r["shard"] for r in results) == [f"s{i}" for i in range(6)]  # each once
    copied = [r.shard.name for r in pool.submitted[6:]]
    assert copied == ["s1", "s0"] and all(r.attempt == 1 for r in pool.submitted)  # copies are not attempts
    assert all(r.actor == 1 for r in pool.submitted[6:])
    assert pool.now <= 5.0

    slow = FakePool(size=2, script=slow_actor_zero)
    schedule(slow, shards(6), Rules(speculate=False))
    assert len(slow.submitted) == 6 and slow.now == 10.0  # without copies: worker 0's 10 s


def test_a_copy_that_fails_while_the_other_runs_is_neither_charged_nor_retried():
    def script(shard, attempt, actor):
        if shard.name == "s0" and actor == 1:  # the copy of s0 fails
            return ShardFailed("RuntimeError: disk full"), 0.5
        return slow_actor_zero(shard, attempt, actor)

    pool = FakePool(size=2, script=script)
    finish, results, lines = schedule(pool, shards(4), Rules(speculate=True))
    assert finish.failed == {} and lines == [] and [r["shard"] for r in results] == ["s2", "s3", "s1", "s0"]
    assert pool.attempts_of("s0") == [1, 1] and pool.now == 10.0  # copied once; the first ran on to its end


def test_the_other_copy_is_cancelled_when_one_finishes():
    cancelled = []
    pool = FakePool(size=2, script=slow_actor_zero)
    pool.cancel = cancelled.append
    schedule(pool, shards(4), Rules(speculate=True))
    losers = [r for r in pool.submitted if r.ticket in cancelled]
    assert {r.shard.name for r in losers} == {"s0", "s1"} and all(r.actor == 0 for r in losers)


def test_a_queued_suspect_gets_a_worker_emptied_for_it_before_the_queue_runs_out():
    """s0 kills its worker, which also ran s1: both become suspects and run alone. s0 is queued
    at the back; rather than wait for a worker that happens to be empty (the end of the job),
    a worker takes nothing new until it is empty, then runs s0 alone."""

    def script(shard, attempt, actor):
        if shard.name == "s0" and actor == 0:
            return WorkerDied("ActorDiedError: SIGKILL"), 1.5
        return finishes(shard, attempt, actor)

    pool = FakePool(size=2, script=script)
    finish, results, _ = schedule(pool, shards(30))
    assert finish.failed == {} and sorted(r["shard"] for r in results) == sorted(s.name for s in shards(30))
    order = [r.shard.name for r in pool.submitted]
    rerun = len(order) - 1 - order[::-1].index("s0")
    assert rerun < order.index("s29"), order
    assert pool.crowding[rerun] == ["s0"]  # alone on its worker


def by_rows(slow_actor: int = 0, factor: float = 10.0):
    """A script: a shard takes 0.1 s per row, `factor` times that on `slow_actor`."""
    def script(shard, attempt, actor):
        return Finished({"shard": shard.name}), 0.1 * shard.num_rows * (factor if actor == slow_actor else 1.0)
    return script


def test_a_slow_worker_takes_the_smallest_shards_from_the_back_of_the_queue():
    """Once worker 0 is known to be slow, it takes the tail's small pieces, never a long shard."""
    big = [Shard(f"b{i}", "m.parquet", i * 10, i * 10 + 10) for i in range(40)]
    small = [Shard(f"p{i}", "m.parquet", 400 + i * 2, 402 + i * 2) for i in range(30)]
    pool = FakePool(size=2, script=by_rows())
    finish, results, _ = schedule(pool, big + small, Rules(speculate=False))
    assert finish.failed == {} and sorted(r["shard"] for r in results) == sorted(s.name for s in big + small)
    first_end = 0.1 * 10 * 10  # worker 0's first shard ends: from then on its pace is known
    on_slow = [(r.ready_at - 0.1 * r.shard.num_rows * 10, r.shard.name) for r in pool.submitted if r.worker == 0]
    later = [name for submitted, name in on_slow if submitted >= first_end]
    assert later and all(name.startswith("p") for name in later), later


def test_a_failed_shard_is_queued_first_not_after_the_rest_of_the_job():
    """At the back of the queue a retry would run last, after the tail's small shards."""
    def script(shard, attempt, actor):
        if shard.name == "s0" and attempt == 1:
            return ShardFailed("RuntimeError: flaky"), 0.5
        return finishes(shard, attempt, actor)

    pool = FakePool(size=1, script=script)
    finish, _, _ = schedule(pool, shards(6))
    assert finish.failed == {}
    assert [(r.shard.name, r.attempt) for r in pool.submitted[:3]] == [("s0", 1), ("s1", 1), ("s0", 2)]


def test_a_straggler_gets_a_copy_before_the_queue_is_empty():
    """Worker 0 runs ten times slower: a shard it holds that would end after everything else is
    copied to a fast worker while shards are still queued, and the first copy to end wins."""
    pool = FakePool(size=4, script=by_rows())
    todo = shards(40)
    finish, results, _ = schedule(pool, todo, Rules(speculate=True))
    assert finish.failed == {} and sorted(r["shard"] for r in results) == sorted(s.name for s in todo)
    names = [r.shard.name for r in pool.submitted]
    copies = [k for k, name in enumerate(names) if name in names[:k]]
    last_new = max(names.index(s.name) for s in todo)
    assert copies and copies[0] < last_new, (copies, last_new)
    assert all(r.attempt == 1 for r in pool.submitted)
