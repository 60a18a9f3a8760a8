"""The driver: validate, plan, start Ray workers, hand out shards, retry, report.

    manifest -> plan -> workers -> writers -> ledger

Everything that can be refused is refused before a model loads or OUTPUT is touched.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from zimage_batch.inputs.manifest import Limits, Manifest, open_manifest, validate_manifest
from zimage_batch.jobspec import JobError, JobSpec, redact_env_vars
from zimage_batch.model.adapter_fit import check_adapters_fit
from zimage_batch.model.adapters import adapter_records, resolve_adapters
from zimage_batch.model.sources import ResolvedModel, guess_variant, resolve_model, source_for_variant
from zimage_batch.model.variants import get_variant
from zimage_batch.output import layout
from zimage_batch.output.ledger import Ledger
from zimage_batch.run import metrics
from zimage_batch.run.plan import Plan, Shard, make_plan
from zimage_batch.run.progress import Progress
from zimage_batch.run.settings import WorkerSettings
from zimage_batch.storage import check_output_store, check_scratch_space, open_storage

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2  # one generating, one reading or uploading beside it
MAX_FREE_REQUEUES = 20  # re-dispatches not charged to a shard (its worker died running another)


@dataclass
class RunSummary:
    output: str
    rows_total: int
    rows_ok: int = 0
    rows_error: int = 0
    shards_committed: int = 0
    shards_skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # shard -> last error
    elapsed_s: float = 0.0
    images_per_s: float = 0.0
    workers: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False

    @property
    def exit_code(self) -> int:
        if self.stopped:
            return 130
        return 1 if self.failed else 0


def prepare(job: JobSpec, check_output: Callable[[], None] | None = None) -> tuple[Any, ResolvedModel]:
    """Check manifest and model without writing anything; returns (manifest, model).

    Order: manifest and job defaults (no model, no network beyond the manifest), then
    `check_output` (an unusable OUTPUT fails before any download), then the model source.
    """
    manifest, variants = check_manifest(job)
    for variant in variants:
        source_for_variant(job.model, job.models, variant, job.variant)  # each variant needs a model
    if check_output is not None:
        check_output()
    adapters = resolve_adapters(job.loras)  # LoRA sources fetched and hashed before the model downloads
    model = resolve_model(job.model, job.variant)
    check_adapters_fit(adapters, model.path)  # keys and shapes against the transformer's config
    return manifest, model


def check_manifest(job: JobSpec) -> tuple[Manifest, set[str]]:
    """The job's defaults and every manifest row, checked without a model (what `validate`
    runs); returns the manifest and the variants its rows run on."""
    manifest = open_manifest(job.manifest)
    job.variant = job.variant or guess_variant(job.model)
    check_defaults(job)
    d = job.defaults()
    limits = Limits(job.variant, d["width"], d["height"], d["num_inference_steps"], d["guidance_scale"], tuple(job.loras))
    return manifest, validate_manifest(manifest, limits)


def check_defaults(job: JobSpec) -> None:
    """The job's own defaults must suit its variant (rows that leave a value empty use them)."""
    v = get_variant(job.variant)
    d = job.defaults()
    for name in ("width", "height"):
        if not v.min_side <= d[name] <= v.max_side:
            raise JobError(f"{name} {d[name]} is beyond the {v.name} model's limits ({v.min_side}..{v.max_side})")
    if not 0 < d["strength"] <= 1:
        raise JobError(f"strength must be in (0, 1], got {d['strength']}")


# Bytes per pixel of a stored image, generously: raw RGB for PNG; lossy formats far less.
_BYTES_PER_PIXEL = {"png": 3.0, "jpeg": 1.0, "webp": 1.0}


def scratch_needed(job: JobSpec) -> int:
    """Local disk that one shard of `job` takes while staged before upload (webdataset and
    parquet; files upload each image at once): at raw size this is about what a worker's two
    shards in flight take with real images."""
    if job.format == "files":
        return 0
    d = job.defaults()
    per_image = d["width"] * d["height"] * _BYTES_PER_PIXEL.get(job.image_format, 3.0) + 1024
    return int(job.shard_size * per_image)


def job_record(job: JobSpec, model: ResolvedModel | None = None) -> dict[str, Any]:
    """What job.json holds: the job as resolved, its defaults and fingerprint (and whether the
    model is a tiny random-init checkpoint, whose images are noise)."""
    resolved = redact_env_vars(job.to_dict())
    for name in ("manifest", "output"):  # local paths as absolute ones, not as typed
        if "://" not in resolved[name]:
            resolved[name] = os.path.abspath(os.path.expanduser(resolved[name]))
    return {
        "fingerprint": job.fingerprint(),
        "job": resolved,
        "defaults": job.defaults(),
        "output_fields": list(JobSpec.OUTPUT_FIELDS),
        "model_draws_noise": bool(model and model.draws_noise),
    } | ({"adapters": adapter_records(job.loras)} if job.loras else {})  # each LoRA's source and sha256


def run_job(job: JobSpec, echo: Callable[[str], None] = print) -> RunSummary:
    started = time.time()
    storage = open_storage(job.output)
    manifest, model = prepare(job, check_output=lambda: check_output_store(storage, job.unsafe_allow_overwriting_commits))
    if not job.address:  # workers run here: their temporary files do too
        check_scratch_space(scratch_needed(job))
    check_cluster_reachable(_cluster_address(job))
    ledger = Ledger(storage)
    ledger.claim_output(job_record(job, model), job.overwrite)
    committed = ledger.committed()
    for shard in ledger.finish_publishing(committed):
        echo(f"published shard {shard}, committed by an earlier run that stopped before publishing it")
    plan = make_plan(manifest, committed, job.shard_size, job.variant)
    _write_plan_record(storage, job, plan, started)
    summary = RunSummary(output=storage.uri, rows_total=plan.total_rows, shards_skipped=len(plan.done))
    echo(
        f"plan: {plan.total_rows} rows in {len(plan.done) + len(plan.todo)} shards; "
        f"{len(plan.done)} shards already committed, {len(plan.todo)} to run"
    )
    if plan.todo:
        _run_plan(job, plan, summary, echo)
    _count_committed(ledger, summary)
    summary.elapsed_s = time.time() - started
    _write_run_record(storage, job, summary)
    return summary


def _count_committed(ledger: Ledger, summary: RunSummary) -> None:
    markers = ledger.committed()
    summary.rows_ok = sum(m.ok for m in markers.values())
    summary.rows_error = sum(m.error for m in markers.values())
    summary.shards_committed = len(markers)


def _write_plan_record(storage, job: JobSpec, plan: Plan, started: float) -> None:
    """`_runs/plan-<time>.json`: totals as planned, so `status` can tell rows left while a run goes on."""
    record = {
        "started": started,
        "fingerprint": job.fingerprint(),
        "total_rows": plan.total_rows,
        "total_shards": len(plan.done) + len(plan.todo),
        "shards_todo": len(plan.todo),
        "rows_todo": plan.rows_todo,
    }
    name = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started)) + f"-{os.getpid()}"
    storage.put_bytes(layout.plan_record_key(name), json.dumps(record, indent=2).encode())


def _write_run_record(storage, job: JobSpec, summary: RunSummary) -> None:
    record = {k: v for k, v in summary.__dict__.items()}
    record["fingerprint"] = job.fingerprint()
    record["finished"] = time.time()
    name = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"
    storage.put_bytes(layout.run_record_key(name), json.dumps(record, indent=2, default=str).encode())


# ---------------------------------------------------------------------- Ray part
# Settings forwarded to Ray workers, which may run on other nodes: where storage and models are
# (endpoint, region, profile name, caches), never credentials. Ray writes the runtime_env to its
# logs in plain text (runtime_env_agent.log), so credentials stay out of it: workers started by
# a local cluster inherit this process's environment; workers on other nodes use their node's
# own AWS chain (instance role, profile, environment).
_FORWARDED_ENV = ("AWS_", "HF_", "ZIMAGE_BATCH_")
_SECRET_ENV_WORDS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "AUTH")


def forwarded_env() -> dict[str, str]:
    """The environment settings passed to Ray workers (no credentials)."""
    return {k: v for k, v in os.environ.items()
            if k.startswith(_FORWARDED_ENV) and not any(w in k.upper() for w in _SECRET_ENV_WORDS)}


def _cluster_address(job: JobSpec) -> str | None:
    """The Ray cluster to join, or None for a new local one."""
    address = job.address or os.environ.get("RAY_ADDRESS")
    return address if address and address != "local" else None


def check_cluster_reachable(address: str | None, timeout: float = 10.0) -> None:
    """A host:port (or ray://host:port) that does not answer fails here, in one line and before
    anything is written: Ray itself would retry it for minutes."""
    if address is None or address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    host = host.strip("[]")  # an IPv6 literal
    if not host or not port.isdigit():
        return  # a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise JobError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def _init_ray(job: JobSpec) -> bool:
    """Join the cluster at job.address or start a local one; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = dict(job.runtime_env or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **forwarded_env()}
    address = _cluster_address(job)
    if address:
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
            runtime_env = None  # a Ray Jobs driver: the submitted job's runtime env already applies
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=True)
        return True
    ray.init(
        address="local",  # a new local cluster, even when another one runs on this machine
        num_cpus=os.cpu_count() or 2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        runtime_env=runtime_env,
    )
    return True


def worker_settings(job: JobSpec, variant: str) -> WorkerSettings:
    """What a `ShardRunner` for `variant` is given: the job, its fingerprint and the variant's defaults."""
    return WorkerSettings.for_variant(job, variant, job.variant, job.fingerprint(), job.defaults(variant))


class WorkerPool:
    """The Ray actors of one job, replaced when they die."""

    def __init__(self, job: JobSpec, variant: str) -> None:
        import ray

        from zimage_batch.run.worker import ShardRunner

        gpus = int(ray.cluster_resources().get("GPU", 0))
        self.use_gpu = gpus > 0 and job.device != "cpu"
        self.size = job.workers or (gpus if self.use_gpu else 1)
        threads = None if self.use_gpu else max(1, (os.cpu_count() or 2) // self.size)
        options: dict[str, Any] = {"max_concurrency": IN_FLIGHT_PER_WORKER, "scheduling_strategy": "SPREAD"}
        options |= {"num_gpus": 1, "num_cpus": 1} if self.use_gpu else {"num_cpus": 0}
        self.actor_class = ray.remote(ShardRunner).options(**options)
        self.settings = worker_settings(job, variant)
        self.threads = threads
        self.actors = [self._start() for _ in range(self.size)]
        self.replacements = 0

    def _start(self):
        return self.actor_class.remote(self.settings, self.threads)

    def replace(self, index: int) -> None:
        _kill(self.actors[index])
        self.actors[index] = self._start()
        self.replacements += 1

    def shutdown(self) -> None:
        for actor in self.actors:
            _kill(actor)

    def stats(self) -> list[dict[str, Any]]:
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


def _kill(actor) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


def _run_plan(job: JobSpec, plan: Plan, summary: RunSummary, echo) -> None:
    """Run the plan's shards: one worker pool per variant, the job's own variant first."""
    import ray

    started_ray = _init_ray(job)
    stop = _StopFlag()
    stop.install()
    try:
        by_variant: dict[str, list[Shard]] = {}
        for shard in plan.todo:
            by_variant.setdefault(shard.variant or job.variant, []).append(shard)
        progress = Progress(plan.rows_todo, 0, job.progress_interval, echo)
        for variant, shards in sorted(by_variant.items(), key=lambda item: item[0] != job.variant):
            if len(by_variant) > 1:
                echo(f"variant {variant}: {len(shards)} shards")
            pool = WorkerPool(job, variant)
            try:
                _run_shards(job, pool, shards, summary, progress, stop, echo)
            finally:
                summary.workers += pool.stats()
                pool.shutdown()
            if summary.stopped:
                break
        summary.images_per_s = progress.rate()
        progress.finish()
    finally:
        stop.uninstall()
        if started_ray:
            ray.shutdown()


def _run_shards(job: JobSpec, pool: "WorkerPool", shards: list[Shard], summary: RunSummary, progress: Progress,
                stop: "_StopFlag", echo) -> None:
    """Hand `shards` to `pool` as workers free up; retry, replace dead workers, honour a stop."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

    queue: deque[Shard] = deque(shards)
    attempts: dict[str, int] = {}
    free_requeues: dict[str, int] = {}
    in_flight: dict[Any, tuple[Shard, int]] = {}  # ref -> (shard, worker index)
    deadline = None
    deaths_in_a_row = 0  # workers that failed to start since the last finished shard
    suspects: set[str] = set()  # shards that were on a worker when it died next to another
    while queue or in_flight:
        if stop.requested and deadline is None:
            deadline = time.time() + job.grace_period
            echo(f"stopping: no new shards; waiting up to {job.grace_period:.0f}s for {len(in_flight)} in flight")
        if deadline is not None and (time.time() > deadline or not in_flight):
            summary.stopped = True
            break
        if deadline is None:
            _dispatch(pool, queue, in_flight, attempts, suspects)
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
        for ref in ready:
            shard, index = in_flight.pop(ref)
            try:
                marker = ray.get(ref)
            except ActorUnavailableError as exc:
                # unreachable for now, not dead: run the shard again, keep the actor
                _on_failure(job, pool, queue, attempts, free_requeues, summary, shard, None, exc, False, echo)
                continue
            except RayActorError as exc:
                if getattr(exc, "actor_init_failed", False):  # the model did not load: no shard's fault
                    deaths_in_a_row += 1
                    if deaths_in_a_row > pool.size * job.max_attempts:
                        raise RuntimeError(
                            f"workers keep dying before they can start ({_short_error(exc)}); "
                            "check that the model loads on the workers' nodes"
                        ) from None
                    queue.appendleft(shard)
                    _drop_worker_refs(in_flight, index, queue, free_requeues)
                    pool.replace(index)
                    continue
                # A worker that ran one shard alone died of it: charge that shard. A worker that ran
                # two leaves both as suspects, which then run alone until the culprit shows.
                others = _drop_worker_refs(in_flight, index, queue, free_requeues)
                alone = not others
                if not alone:
                    suspects.update([shard.name, *(o.name for o in others)])
                _on_failure(job, pool, queue, attempts, free_requeues, summary, shard, index, exc, alone, echo)
                continue
            except RayTaskError as exc:
                _on_failure(job, pool, queue, attempts, free_requeues, summary, shard, None, exc, True, echo)
                continue
            deaths_in_a_row = 0
            suspects.discard(shard.name)
            if marker is not None:  # None: another attempt had committed the shard
                progress.shard_done(marker.rows, marker.error)
        progress.tick(len(queue), len(in_flight), pool.size)
        metrics.queue_depth(len(queue), len(in_flight))


def _dispatch(pool: WorkerPool, queue: deque, in_flight: dict, attempts: dict[str, int], suspects: set[str]) -> None:
    """Fill each worker up to IN_FLIGHT_PER_WORKER shards; a suspect shard runs alone on a worker."""
    for index, actor in enumerate(pool.actors):
        mine = [s for s, i in in_flight.values() if i == index]
        if any(s.name in suspects for s in mine):
            continue
        while queue and len(mine) < IN_FLIGHT_PER_WORKER:
            position = 0 if not mine else next((k for k, s in enumerate(queue) if s.name not in suspects), None)
            if position is None:
                break
            shard = queue[position]
            del queue[position]
            ref = actor.run_shard.remote(shard, attempts.get(shard.name, 0) + 1)
            in_flight[ref] = (shard, index)
            mine.append(shard)
            if shard.name in suspects:
                break


def _drop_worker_refs(in_flight: dict, index: int, queue: deque, free_requeues: dict[str, int]) -> list[Shard]:
    """Shards in flight on a worker that died: queued again, not charged an attempt."""
    dropped = []
    for ref in [r for r, (_, i) in in_flight.items() if i == index]:
        shard, _ = in_flight.pop(ref)
        free_requeues[shard.name] = free_requeues.get(shard.name, 0) + 1
        queue.appendleft(shard)
        dropped.append(shard)
    return dropped


def _on_failure(job, pool, queue, attempts, free_requeues, summary, shard, dead_index, exc, charged, echo) -> None:
    reason = _short_error(exc)
    if dead_index is not None:
        pool.replace(dead_index)
    if charged or free_requeues.get(shard.name, 0) >= MAX_FREE_REQUEUES:
        attempts[shard.name] = attempts.get(shard.name, 0) + 1
    else:
        free_requeues[shard.name] = free_requeues.get(shard.name, 0) + 1
    if attempts.get(shard.name, 0) >= job.max_attempts:
        summary.failed[shard.name] = reason
        echo(f"shard {shard.name} failed {attempts[shard.name]} times, giving up: {reason}")
    else:
        echo(f"shard {shard.name} attempt {attempts.get(shard.name, 0)} failed ({reason}); retrying")
        queue.append(shard)


def _short_error(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


class _StopFlag:
    """SIGTERM / SIGINT: stop dispatching and let in-flight shards finish within the grace period."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C abandons in-flight shards at once
        self.requested = True

    def install(self) -> None:
        if sys.platform != "win32":
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self.previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
