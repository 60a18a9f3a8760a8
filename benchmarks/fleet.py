"""A thousand GPUs on a virtual clock: the real scheduler driving simulated workers.

    python benchmarks/fleet.py                      # 1,000 workers, 10^7 images, 5% slow at 3x, 5%/h preemption
    python benchmarks/fleet.py --json               # the same, one JSON object
    python benchmarks/fleet.py --speculate off      # without second copies of tail shards
    python benchmarks/fleet.py --tail off           # the plan's shards kept whole (no pieces at the end)
    python benchmarks/fleet.py --slow-share 0 --preempt-per-hour 0     # no faults

`zimage_batch.run.scheduler.Scheduler` runs unchanged; its pool is `SimPool` below, whose
`wait()` jumps the clock to the next event instead of sleeping. Each worker runs its shards one
after another (the GPU is the bottleneck); a shard takes rows x s/img x the worker's speed
factor x a log-normal jitter. A share of workers is slow; workers are preempted (Poisson, per
worker) and whole nodes lost (Poisson, per fleet): the shards they held come back to the
scheduler as `WorkerDied` (a worker that died idle, at the next shard sent to it, as a Ray actor
does), and the worker the scheduler puts in its place starts work after a delay. The shards are
the plan's, their tail cut smaller as `zimage-batch run` cuts it (`run/tail.py`). A cancelled
copy (the other copy finished) stops at once.

Figures: makespan / ideal (ideal = total work / workers, at nominal speed, so slow workers and
replacement delays count against it), GPU-hours idle in the tail (each worker from its last
work to the end), GPU-hours lost to preemptions and node loss (work redone), GPU-hours spent on
copies that lost, the scheduler's own CPU time per dispatched shard (process time of
`Scheduler.run` less the simulator's calls), and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zimage_batch.run.plan import Shard  # noqa: E402
from zimage_batch.run.scheduler import Finished, Outcome, Rules, Scheduler, Ticket, WorkerDied  # noqa: E402
from zimage_batch.run.tail import cut_tail  # noqa: E402


@dataclass
class Scenario:
    workers: int = 1000
    images: int = 10_000_000
    shard_size: int = 1000
    s_per_img: float = 0.9  # one 1024x1024 image on one GPU
    jitter: float = 0.05  # sigma of the log-normal factor on each shard's duration
    slow_share: float = 0.05
    slow_factor: float = 3.0
    preempt_per_hour: float = 0.05  # per worker
    node_loss_per_hour: float = 0.0  # per fleet: a node and all its GPUs
    gpus_per_node: int = 8
    replace_delay_s: float = 300.0  # a preempted or lost worker's replacement starts work after this
    speculate: bool = True
    tail: bool = True  # the planner's last shards cut smaller (run/tail.py), as `zimage-batch run` does
    seed: int = 0


@dataclass
class _Actor:
    slot: int
    speed: float
    ready_at: float
    queue: list[Ticket] = field(default_factory=list)  # running first, then waiting
    running_since: float | None = None
    alive: bool = True


class SimPool:
    """The scheduler's `WorkerPool` on a virtual clock (see the module's docstring)."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.size = sc.workers
        self.rng = random.Random(sc.seed)
        self.now = 0.0
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.tickets = itertools.count()
        self.shard_of: dict[Ticket, Shard] = {}
        self.actor_of: dict[Ticket, _Actor] = {}
        self.slots = [self._new_actor(w, 0.0) for w in range(sc.workers)]
        self.last_end = [0.0] * sc.workers  # each slot's last moment of work
        self.useful_s = self.redone_s = self.copies_lost_s = 0.0
        self.preemptions = self.nodes_lost = 0
        self.beaten = -60.0  # when heartbeats last answered
        self._next_node_loss()

    # ------------------------------------------------------------------ events
    def _push(self, at: float, kind: str, data: Any) -> None:
        heapq.heappush(self.events, (at, next(self.seq), kind, data))

    def _new_actor(self, slot: int, ready_at: float) -> _Actor:
        slow = self.rng.random() < self.sc.slow_share
        actor = _Actor(slot, self.sc.slow_factor if slow else 1.0, ready_at)
        if self.sc.preempt_per_hour > 0:
            self._push(ready_at + self.rng.expovariate(self.sc.preempt_per_hour / 3600), "preempt", actor)
        return actor

    def _next_node_loss(self) -> None:
        if self.sc.node_loss_per_hour > 0:
            self._push(self.now + self.rng.expovariate(self.sc.node_loss_per_hour / 3600), "node", None)

    def _start_next(self, actor: _Actor) -> None:
        if not actor.queue or actor.running_since is not None:
            return
        ticket = actor.queue[0]
        actor.running_since = max(self.now, actor.ready_at)
        rows = self.shard_of[ticket].num_rows
        duration = rows * self.sc.s_per_img * actor.speed * self.rng.lognormvariate(0.0, self.sc.jitter)
        self._push(actor.running_since + duration, "done", (actor, ticket))

    def _kill(self, actor: _Actor) -> list[tuple[Ticket, Outcome]]:
        """The actor is gone: its running shard's work is lost; everything it held dies with it."""
        actor.alive = False
        if actor.running_since is not None and actor.running_since < self.now:
            self.redone_s += self.now - actor.running_since
            self.last_end[actor.slot] = self.now
        return [(t, WorkerDied("ActorDiedError: the node was preempted")) for t in actor.queue]

    # ------------------------------------------------------------------ WorkerPool
    def submit(self, worker: int, shard: Shard, attempt: int) -> Ticket:
        ticket = next(self.tickets)
        actor = self.slots[worker]
        self.shard_of[ticket], self.actor_of[ticket] = shard, actor
        actor.queue.append(ticket)
        if actor.alive:
            self._start_next(actor)
        else:  # it died idle: as with Ray, the next call to it fails at once
            self._push(self.now, "dead", (actor, ticket))
        return ticket

    def wait(self, tickets: Sequence[Ticket], timeout: float) -> list[tuple[Ticket, Outcome]]:
        until = self.now + timeout
        while self.events and self.events[0][0] <= until:
            at, _, kind, data = heapq.heappop(self.events)
            self.now = max(self.now, at)
            out = self._event(kind, data)
            if out:
                return out
        self.now = until
        return []

    def _event(self, kind: str, data: Any) -> list[tuple[Ticket, Outcome]]:
        if kind == "done":
            actor, ticket = data
            if not actor.alive or not actor.queue or actor.queue[0] != ticket:
                return []  # cancelled, or its worker died
            self.useful_s += self.now - actor.running_since
            self.last_end[actor.slot] = self.now
            actor.queue.pop(0)
            actor.running_since = None
            self._start_next(actor)
            shard = self.shard_of.pop(ticket)
            return [(ticket, Finished({"shard": shard.name, "rows": shard.num_rows}))]
        if kind == "dead":
            actor, ticket = data
            return [(ticket, WorkerDied("ActorDiedError: the node was preempted"))] if ticket in actor.queue else []
        if kind == "preempt":
            if not data.alive:
                return []
            self.preemptions += 1
            return self._kill(data)
        self.nodes_lost += 1  # "node"
        self._next_node_loss()
        node = self.rng.randrange(max(1, self.size // self.sc.gpus_per_node))
        slots = range(node * self.sc.gpus_per_node, min(self.size, (node + 1) * self.sc.gpus_per_node))
        return [lost for w in slots if self.slots[w].alive for lost in self._kill(self.slots[w])]

    def replace(self, worker: int) -> None:
        old = self.slots[worker]
        if old.alive:
            self._kill(old)
        self.slots[worker] = self._new_actor(worker, self.now + self.sc.replace_delay_s)

    def heartbeats(self) -> dict[int, Any]:
        """Simulated workers never hang: every live one answers, its progress moving with the
        clock, once a virtual minute, loading its model until it is ready."""
        try:
            from zimage_batch.run.heartbeat import Heartbeat
        except ImportError:  # a scheduler without the stall check
            return {}
        if self.now - self.beaten < 60.0:
            return {}
        self.beaten = self.now
        return {w: Heartbeat(f"sim:{w}", int(self.now), loading=self.now < actor.ready_at)
                for w, actor in enumerate(self.slots) if actor.alive}

    def cancel(self, ticket: Ticket) -> None:
        """The other copy of this shard finished: a waiting copy is dropped, a running one stops."""
        actor = self.actor_of.get(ticket)
        if actor is None or not actor.alive or ticket not in actor.queue:
            return
        if actor.queue[0] == ticket and actor.running_since is not None:
            if actor.running_since < self.now:
                self.copies_lost_s += self.now - actor.running_since
                self.last_end[actor.slot] = self.now
            actor.running_since = None
            actor.queue.pop(0)
            self._start_next(actor)
        else:
            actor.queue.remove(ticket)


class Timed:
    """Wraps the pool, adding up the process time spent in it (the simulator's, not the scheduler's)."""

    def __init__(self, pool: SimPool) -> None:
        self.pool, self.size, self.spent, self.waits, self.submits = pool, pool.size, 0.0, 0, 0

    def _timed(self, method: str, *args: Any) -> Any:
        started = time.process_time()
        try:
            return getattr(self.pool, method)(*args)
        finally:
            self.spent += time.process_time() - started

    def submit(self, worker: int, shard: Shard, attempt: int) -> Ticket:
        self.submits += 1
        return self._timed("submit", worker, shard, attempt)

    def wait(self, tickets: Sequence[Ticket], timeout: float) -> list[tuple[Ticket, Outcome]]:
        self.waits += 1
        return self._timed("wait", tickets, timeout)

    def replace(self, worker: int) -> None:
        self._timed("replace", worker)

    def cancel(self, ticket: Ticket) -> None:
        self._timed("cancel", ticket)

    def heartbeats(self) -> dict[int, Any]:
        return self._timed("heartbeats")


def simulate(sc: Scenario) -> dict[str, Any]:
    shards = [Shard(f"m-{start:010d}", "m.parquet", start, min(start + sc.shard_size, sc.images))
              for start in range(0, sc.images, sc.shard_size)]
    if sc.tail:
        shards = cut_tail(shards, sc.workers)
    sim = SimPool(sc)
    pool = Timed(sim)
    lines: list[str] = []
    scheduler = Scheduler(pool, shards, Rules(speculate=sc.speculate), echo=lines.append, clock=lambda: sim.now)
    started = time.process_time()
    wall = time.perf_counter()
    finish = scheduler.run()
    scheduler_cpu = time.process_time() - started - pool.spent
    ideal = sc.images * sc.s_per_img / sc.workers
    makespan = sim.now
    hour = 3600.0
    state = scheduler.state
    return {
        "workers": sc.workers, "images": sc.images, "shard_size": sc.shard_size, "s_per_img": sc.s_per_img,
        "slow_share": sc.slow_share, "slow_factor": sc.slow_factor, "preempt_per_hour": sc.preempt_per_hour,
        "node_loss_per_hour": sc.node_loss_per_hour, "speculate": sc.speculate, "tail": sc.tail,
        "seed": sc.seed,
        "makespan_h": makespan / hour,
        "ideal_h": ideal / hour,
        "makespan_over_ideal": makespan / ideal,
        "tail_idle_gpu_hours": sum(makespan - end for end in sim.last_end) / hour,
        "redone_gpu_hours": sim.redone_s / hour,
        "lost_copies_gpu_hours": sim.copies_lost_s / hour,
        "fleet_gpu_hours": sc.workers * makespan / hour,
        "work_gpu_hours": sim.useful_s / hour,
        "preemptions": sim.preemptions,
        "nodes_lost": sim.nodes_lost,
        "copies_started": state.copies_started,
        "copies_cancelled": state.copies_cancelled,
        "shards": len(shards),
        "shards_failed": len(finish.failed),
        "dispatches": pool.submits,
        "scheduler_cpu_s": scheduler_cpu,
        "dispatch_cpu_ms": 1000 * scheduler_cpu / max(1, pool.submits),
        "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": time.perf_counter() - wall,
    }


def main(argv: Sequence[str] | None = None) -> None:
    d = Scenario()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--images", type=int, default=d.images)
    p.add_argument("--shard-size", type=int, default=d.shard_size)
    p.add_argument("--s-per-img", type=float, default=d.s_per_img)
    p.add_argument("--jitter", type=float, default=d.jitter)
    p.add_argument("--slow-share", type=float, default=d.slow_share)
    p.add_argument("--slow-factor", type=float, default=d.slow_factor)
    p.add_argument("--preempt-per-hour", type=float, default=d.preempt_per_hour, help="per worker")
    p.add_argument("--node-loss-per-hour", type=float, default=d.node_loss_per_hour, help="per fleet")
    p.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    p.add_argument("--replace-delay", type=float, default=d.replace_delay_s, help="seconds")
    p.add_argument("--speculate", choices=("on", "off"), default="on")
    p.add_argument("--tail", choices=("on", "off"), default="on", help="cut the last shards smaller")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    sc = Scenario(a.workers, a.images, a.shard_size, a.s_per_img, a.jitter, a.slow_share, a.slow_factor,
                  a.preempt_per_hour, a.node_loss_per_hour, a.gpus_per_node, a.replace_delay, a.speculate == "on",
                  a.tail == "on", a.seed)
    r = simulate(sc)
    if a.json:
        print(json.dumps(r))
        return
    print(f"{r['workers']} workers, {r['images']:,} images in {r['shards']:,} shards of {r['shard_size']}, "
          f"{r['s_per_img']} s/img; {r['slow_share']:.0%} slow at {r['slow_factor']}x, "
          f"preemption {r['preempt_per_hour']:.0%}/h, node loss {r['node_loss_per_hour']}/h; "
          f"speculate {'on' if r['speculate'] else 'off'}, tail {'on' if r['tail'] else 'off'}")
    print(f"makespan {r['makespan_h']:.3f} h, ideal {r['ideal_h']:.3f} h: {r['makespan_over_ideal']:.3f}x")
    print(f"GPU-hours: fleet {r['fleet_gpu_hours']:.0f}, work {r['work_gpu_hours']:.0f}, "
          f"tail idle {r['tail_idle_gpu_hours']:.0f}, redone {r['redone_gpu_hours']:.1f}, "
          f"lost copies {r['lost_copies_gpu_hours']:.1f}")
    print(f"preemptions {r['preemptions']}, nodes lost {r['nodes_lost']}, copies {r['copies_started']} "
          f"({r['copies_cancelled']} cancelled), shards failed {r['shards_failed']}")
    print(f"scheduler: {r['dispatch_cpu_ms']:.3f} ms CPU per dispatch ({r['dispatches']} dispatches); "
          f"driver peak RSS {r['driver_peak_mib']:.0f} MiB; {r['wall_s']:.1f} s wall")


if __name__ == "__main__":
    main()
