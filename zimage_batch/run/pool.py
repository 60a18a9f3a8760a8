"""The Ray actor pool: `ShardRunner` actors of one variant, the `WorkerPool` the scheduler drives.

It starts the actors (one GPU each when the cluster has GPUs, else CPU threads shared out, or
ZIMAGE_BATCH_CPU_THREADS each),
submits a shard to one of them, waits, and turns Ray's exceptions into the scheduler's typed
outcomes. It keeps one heartbeat call out to each actor and hands the scheduler the answers
that came back (a frozen actor's never does). Ray is imported inside the methods: the rest of
the package loads without it.
"""

from __future__ import annotations

import os
import platform
import threading
from typing import Any, Sequence

from zimage_batch.run.heartbeat import Heartbeat, ProgressCounter
from zimage_batch.run.plan import Shard
from zimage_batch.run.scheduler import (
    IN_FLIGHT_PER_WORKER,
    FailedToStart,
    Finished,
    Outcome,
    ShardFailed,
    Ticket,
    Unavailable,
    WorkerDied,
)
from zimage_batch.run.settings import WorkerSettings


def short_error(exc: BaseException) -> str:
    """`Type: last line` of an exception (Ray puts the remote error's own line last), at most 300 characters."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def outcome_of(ref: Any) -> Outcome:
    """How the shard behind a ready object ref ended."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

    try:
        return Finished(ray.get(ref))
    except ActorUnavailableError as exc:  # unreachable for now, not dead (a subclass of RayActorError)
        return Unavailable(short_error(exc))
    except RayActorError as exc:
        if getattr(exc, "actor_init_failed", False):
            return FailedToStart(short_error(exc))
        return WorkerDied(short_error(exc))
    except RayTaskError as exc:
        if isinstance(exc.cause, ModelNotLoaded):  # the model loads beside the actor's start
            return FailedToStart(str(exc.cause))
        return ShardFailed(short_error(exc))


CPU_THREADS_ENV = "ZIMAGE_BATCH_CPU_THREADS"
CANCELLED_WAIT_S = 30.0  # at shutdown, the longest wait for cancelled copies to remove their staged files


def cpu_threads_setting(environ: Any = os.environ) -> int | None:
    """`ZIMAGE_BATCH_CPU_THREADS` of the driver's environment: torch threads of each CPU worker,
    None where unset. Several jobs sharing a machine's cores set it, or their OpenMP teams spin
    against each other. (Not OMP_NUM_THREADS: Ray sets that to 1 in Ray Jobs drivers and in the
    commands its cluster launcher runs.)"""
    value = environ.get(CPU_THREADS_ENV, "").strip()
    if not value:
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{CPU_THREADS_ENV} must be a whole number of threads of at least 1, not {value!r}")
    return threads


def cpu_threads_per_worker(workers: int, setting: int | None) -> int:
    """The setting, else this machine's cores shared among the workers."""
    return setting or max(1, (os.cpu_count() or 2) // workers)


class ModelNotLoaded(RuntimeError):
    """The worker's model did not load (the message names why): the worker cannot run shards."""


class ShardRunnerActor:
    """The Ray actor around a `run.worker.ShardRunner`. The model stack (torch, diffusers) is
    imported on the worker only: the driver, which creates the actors from this class, never
    loads it (1-2 s of start-up and a few hundred MB per run otherwise).

    The model loads on a thread of its own, so that the actor answers `heartbeat()` from the
    start (a model download may take many minutes); `run_shard` waits for it, and raises
    `ModelNotLoaded` if it failed."""

    def __init__(self, settings: WorkerSettings, threads: int | None = None, index: int = 0) -> None:
        """`index`: the worker's place in its pool."""
        self.worker_id = f"{platform.node()}:{os.getpid()}"
        self.progress = ProgressCounter()
        self._runner: Any = None
        self._load_error = ""
        self._loaded = threading.Event()
        threading.Thread(target=self._load, args=(settings, threads, index), name="load-model", daemon=True).start()

    def _load(self, settings: WorkerSettings, threads: int | None, index: int) -> None:
        try:
            from zimage_batch.run.worker import ShardRunner

            self._runner = ShardRunner(settings, threads, index, progress=self.progress)
        except BaseException as exc:  # noqa: BLE001 - reported to the scheduler by run_shard
            self._load_error = short_error(exc)
        finally:
            self._loaded.set()
            self.progress.tick()

    def _ready(self) -> Any:
        self._loaded.wait()
        if self._runner is None:
            raise ModelNotLoaded(self._load_error)
        return self._runner

    def run_shard(self, shard: Shard, attempt: int = 1) -> Any:
        return self._ready().run_shard(shard, attempt)

    def heartbeat(self) -> Heartbeat:
        return self.progress.heartbeat(self.worker_id, loading=not self._loaded.is_set())

    def stats(self) -> dict[str, Any]:
        return self._ready().stats()


class RayWorkerPool:
    """The Ray actors of one job and variant, replaced when they die.

    `settings` is what each `ShardRunner` is built from (one variant's); `workers` is the pool
    size (default: one per GPU, or 1 on CPU); `cpu_threads` is `cpu_threads_setting()`."""

    def __init__(self, settings: WorkerSettings, workers: int | None = None, device: str | None = None,
                 cpu_threads: int | None = None) -> None:
        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0))
        self.use_gpu = gpus > 0 and device != "cpu"
        self.size = workers or (gpus if self.use_gpu else 1)
        threads = None if self.use_gpu else cpu_threads_per_worker(self.size, cpu_threads)
        # One thread more than the shards in flight: heartbeats are answered beside them.
        options: dict[str, Any] = {"max_concurrency": IN_FLIGHT_PER_WORKER + 1, "scheduling_strategy": "SPREAD"}
        options |= {"num_gpus": 1, "num_cpus": 1} if self.use_gpu else {"num_cpus": 0}
        self._actor_class = ray.remote(ShardRunnerActor).options(**options)
        self._args = (settings, threads)
        self.actors = [self._start(worker) for worker in range(self.size)]
        self.replacements = 0
        self._beats: dict[Any, int] = {}  # heartbeat call out -> its worker
        self.cancelled: list[Any] = []  # tickets no longer waited for, still perhaps running

    def _start(self, worker: int) -> Any:
        return self._actor_class.remote(*self._args, worker)

    # ------------------------------------------------------------------ WorkerPool
    def submit(self, worker: int, shard: Shard, attempt: int) -> Ticket:
        return self.actors[worker].run_shard.remote(shard, attempt)

    def wait(self, tickets: Sequence[Ticket], timeout: float) -> list[tuple[Ticket, Outcome]]:
        import ray

        if not tickets:
            return []
        ready, _ = ray.wait(list(tickets), num_returns=1, timeout=timeout)
        return [(ref, outcome_of(ref)) for ref in ready]

    def replace(self, worker: int) -> None:
        _kill(self.actors[worker])
        self.actors[worker] = self._start(worker)
        self.replacements += 1
        self._beats = {ref: w for ref, w in self._beats.items() if w != worker}  # the old actor's

    def heartbeats(self) -> dict[int, Heartbeat]:
        import ray

        answered: dict[int, Heartbeat] = {}
        ready, _ = ray.wait(list(self._beats), num_returns=len(self._beats), timeout=0) if self._beats else ([], [])
        for ref in ready:
            worker = self._beats.pop(ref)
            try:
                answered[worker] = ray.get(ref)
            except Exception:  # noqa: BLE001 - a dead worker: its shards' outcomes say so
                pass
        for worker in set(range(self.size)) - set(self._beats.values()):
            try:
                self._beats[self.actors[worker].heartbeat.remote()] = worker
            except Exception:  # noqa: BLE001 - a dead worker: its shards' outcomes say so
                pass
        return answered

    def cancel(self, ticket: Ticket) -> None:
        """The other copy of the shard committed: Ray drops this one if it has not started; if it
        runs, it sees the commit before its next batch, removes its staged files and returns."""
        import ray

        self.cancelled.append(ticket)
        try:
            ray.cancel(ticket)
        except Exception:  # noqa: BLE001 - it ended meanwhile, or Ray cannot cancel it: it stops itself
            pass

    # ------------------------------------------------------------------ the rest
    def shutdown(self) -> None:
        """Stop the workers, once cancelled copies have cleaned up (up to CANCELLED_WAIT_S)."""
        import ray

        if self.cancelled:
            ray.wait(self.cancelled, num_returns=len(self.cancelled), timeout=CANCELLED_WAIT_S)
        for actor in self.actors:
            _kill(actor)

    def stats(self) -> list[dict[str, Any]]:
        """Each live worker's figures (busy share, wall time); dead or busy workers have none."""
        import ray

        refs = []
        for actor in self.actors:
            try:
                refs.append(actor.stats.remote())
            except Exception:  # noqa: BLE001 - a dead worker has no figures
                pass
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=30)  # one wait for all, not 30 s each
        out = []
        for ref in ready:
            try:
                out.append(ray.get(ref))
            except Exception:  # noqa: BLE001 - a dead or busy worker has no figures
                pass
        return out


def _kill(actor: Any) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass
