"""The driver: one job, from its settings to its records.

    preflight ─► lease on OUTPUT ─► claim OUTPUT (job.json) ─► overlaps ─► plan ─► run: cluster,
    a worker pool per variant, the scheduler ─► the summary ─► release ─► finish: the run's
    record (_runs/), the dataset card, the report

Each step has its module: `preflight` (refusals before anything is written, the job resolved
once), `cluster` (Ray start-up, the workers' environment, shared paths), `pool` (Ray actors),
`scheduler` (queue, retries, stop), `plan` (shards), `finish` (record, card, report). This one
tells the story.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from pyarrow.fs import LocalFileSystem

from zimage_batch.inputs.manifest import Manifest
from zimage_batch.jobspec import JobSpec
from zimage_batch.output import layout
from zimage_batch.output.lease import Lease, new_run_id
from zimage_batch.output.ledger import CommitMarker, Ledger
from zimage_batch.output.overlaps import OverlappingShards, overlap_line, settle_overlaps, without_extras
from zimage_batch.output.throughput import run_throughput
from zimage_batch.run import metrics
from zimage_batch.run.cluster import RayCluster, check_reachable, check_shared_paths
from zimage_batch.run.estimate import NOISE_NOTE, count_images, estimate, run_key
from zimage_batch.run.finish import finish_run
from zimage_batch.run.output_store import check_output_store, check_scratch_space
from zimage_batch.run.plan import Plan, Shard, make_plan
from zimage_batch.run.pool import RayWorkerPool, cpu_threads_setting
from zimage_batch.run.preflight import Prepared, ResolvedJob, absolute, job_record, prepare, scratch_needed
from zimage_batch.run.progress import Progress
from zimage_batch.run.scheduler import Rules, Scheduler, StopRequest
from zimage_batch.run.summary import RunSummary
from zimage_batch.run.tail import cut_tail
from zimage_batch.storage import Storage, is_s3, open_storage
from zimage_batch.text import plural


def run_job(job: JobSpec, echo: Callable[[str], None] = print) -> RunSummary:
    """Run `job` to its end (or a stop), then write its record, dataset card and report; returns
    the summary (`summary.finish`: where card and report are). Refusals raise before anything is written."""
    started = time.time()
    cpu_threads = cpu_threads_setting()  # ZIMAGE_BATCH_CPU_THREADS: a bad value is refused first
    storage = open_storage(absolute(job.output))
    prepared = prepare(job, check_output=lambda: check_output_store(storage, job.unsafe_allow_overwriting_commits),
                       warn=echo)
    resolved = prepared.job
    cluster = RayCluster(resolved.spec.address, resolved.spec.runtime_env)
    if not cluster.external:  # workers run here: their temporary files do too
        check_scratch_space(scratch_needed(resolved))
    check_reachable(cluster.address)
    run = _Run(resolved, prepared, storage, cluster, new_run_id(), started, echo, cpu_threads)
    lease = Lease(storage, run.id, resolved.spec.lease_ttl, resolved.spec.lease_renew_interval, echo)
    with cluster:
        if cluster.external:  # its nodes may be other machines: they must see our local paths
            cluster.connect()
            _check_local_paths_shared(storage, prepared.manifest)
        lease.acquire(wait=resolved.spec.wait)
        try:
            lease.keep_renewed(on_lost=run.lose_lease)
            summary, markers = _run_holding_lease(run)
            if not lease.lost:  # every pool is shut down: what killed attempts and failed deletes left
                Ledger(storage).sweep_staging(markers, echo=echo)
        finally:
            lease.release()
    summary.lost_lease = lease.lost
    summary.finish = finish_run(storage, resolved, summary, markers.values())
    return summary


@dataclass
class _Run:
    """One run of a job: what its steps share."""

    job: ResolvedJob
    prepared: Prepared
    storage: Storage
    cluster: RayCluster
    id: str  # the run's id: its lease's fencing token, in every marker it commits
    started: float
    echo: Callable[[str], None]
    cpu_threads: int | None  # torch threads of each CPU worker (None: the cores shared out)
    stop: StopRequest = field(default_factory=StopRequest)

    def lose_lease(self, reason: str) -> None:
        """Another run took OUTPUT's lease over: commit nothing more, stop."""
        self.echo(f"error: {reason}; stopping")
        self.stop.request()


def _run_holding_lease(run: _Run) -> tuple[RunSummary, dict[str, CommitMarker]]:
    """Claim OUTPUT, settle what earlier runs left, plan, run, count: all under OUTPUT's lease.
    Returns the summary and the commit markers as the run's end read them (once)."""
    resolved, prepared, storage, echo, started = run.job, run.prepared, run.storage, run.echo, run.started
    ledger = Ledger(storage)
    ledger.claim_output(job_record(resolved, prepared.model), resolved.spec.overwrite)
    committed, overlaps = settle_overlaps(ledger, ledger.committed(), echo)
    if overlaps:
        raise OverlappingShards(overlap_line(storage.uri, overlaps))
    ledger.sweep_staging(committed, echo)  # leftovers of earlier runs: no other writer now
    for shard in ledger.forget_lost(committed):
        echo(f"shard {shard} was committed but its files are gone; its rows are drawn again")
        del committed[shard]
    plan = make_plan(prepared.manifest, committed, resolved.spec.shard_size, resolved.variant)
    if prepared.model.draws_noise:  # said before any work (after every refusal), not only in the report
        echo(NOISE_NOTE.format(model=resolved.spec.model))
    _write_plan_record(storage, resolved, plan, started, run.id)
    summary = RunSummary(output=storage.uri, rows_total=plan.total_rows, shards_skipped=len(plan.done),
                         started=started, run=run.id)
    echo(
        f"plan: {plural(plan.total_rows, 'row')} in {plural(len(plan.done) + len(plan.todo), 'shard')}; "
        f"{plural(len(plan.done), 'shard')} already committed, {len(plan.todo)} to run"
    )
    echo(cost_line(resolved, prepared.manifest, plan, storage))
    if plan.todo:
        run.cluster.connect()

        def cut(pieces: int) -> None:  # the plan record counts the tail's pieces
            _write_plan_record(storage, resolved, plan, started, run.id, pieces)

        _run_plan(resolved, plan, summary, echo, run.stop, run.cpu_threads, cut)
    summary.elapsed_s = time.time() - started
    return summary, _count_committed(ledger, summary, echo)


def _check_local_paths_shared(storage: Storage, manifest: Manifest) -> None:
    """A local OUTPUT or manifest must be what every node of the cluster sees at the same path."""
    output = None if is_s3(storage.uri) else storage.uri
    files = [f.path for f in manifest.files] if isinstance(manifest.fs, LocalFileSystem) else []
    check_shared_paths(output, files)


def _run_plan(job: ResolvedJob, plan: Plan, summary: RunSummary, echo: Callable[[str], None],
              stop: StopRequest, cpu_threads: int | None = None,
              on_cut: Callable[[int], None] = lambda pieces: None) -> None:
    """Run the plan's shards: one worker pool per variant, the job's own variant first
    (`cpu_threads`: torch threads of each CPU worker, None to share the cores out). Each
    pool's last shards are cut smaller for its size (`run/tail.py`); `on_cut` gets the
    shards that added, over all pools so far."""
    spec = job.spec
    rules = Rules(max_attempts=spec.max_attempts, grace_period=spec.grace_period, stall_timeout=spec.stall_timeout,
                  speculate=spec.speculate)
    stop.install()
    try:
        by_variant: dict[str, list[Shard]] = {}
        for shard in plan.todo:
            by_variant.setdefault(shard.variant or job.variant, []).append(shard)
        progress = Progress(plan.rows_todo, 0, spec.progress_interval, echo, started=summary.started)
        added = 0  # shards the tail's cuts added
        counted: set[str] = set()  # shards in the progress figures

        def tick(queued: int, in_flight: int, workers: int) -> None:
            progress.tick(queued, in_flight, workers)
            metrics.queue_depth(queued, in_flight)

        for variant, shards in sorted(by_variant.items(), key=lambda item: item[0] != job.variant):
            if len(by_variant) > 1:
                echo(f"variant {variant}: {plural(len(shards), 'shard')}")
            settings = dataclasses.replace(job.worker_settings(variant), run=summary.run)
            pool = RayWorkerPool(settings, spec.workers, spec.device, cpu_threads)
            summary.device = "GPU" if pool.use_gpu else "CPU"
            cut = cut_tail(shards, pool.size)
            if len(cut) > len(shards):
                added += len(cut) - len(shards)
                on_cut(added)
                shards = cut
            try:
                finish = Scheduler(pool, shards, rules, on_result=lambda result: _account(progress, counted, result),
                                   on_tick=tick, echo=echo, stop=stop).run()
            finally:
                summary.workers += pool.stats()
                pool.shutdown()
            summary.failed.update(finish.failed)
            summary.stopped = finish.stopped
            if finish.stopped:
                break
        progress.finish()
    finally:
        stop.uninstall()


def _account(progress: Progress, counted: set[str], marker: CommitMarker | None) -> None:
    """A finished shard's result (its commit marker, whichever attempt committed it) into the
    progress figures, once per shard: a copy that lost answers with the winner's marker."""
    if marker is not None and marker.shard not in counted:
        counted.add(marker.shard)
        progress.shard_done(marker.rows, marker.error, marker.ok)


def _count_committed(ledger: Ledger, summary: RunSummary, echo: Callable[[str], None]) -> dict[str, CommitMarker]:
    """Totals over every committed shard (each row once), and this run's throughput from the
    shards it committed. Reads the commit markers (the one reading of `_commits/` at the run's
    end) and returns them, unpublished overlapping ones removed, for the sweep and the finish."""
    settled, overlaps = settle_overlaps(ledger, ledger.committed(), echo)
    markers = list(settled.values())
    if overlaps:
        summary.overlaps = overlap_line(ledger.storage.uri, overlaps)
        markers = without_extras(markers, overlaps)
    summary.rows_ok = sum(m.ok for m in markers)
    summary.rows_error = sum(m.error for m in markers)
    summary.rows_filtered = sum(m.filtered for m in markers)
    summary.rows_done = sum(m.rows for m in markers)
    summary.shards_committed = len(markers)
    summary.throughput = run_throughput(markers, summary.started, summary.elapsed_s, summary.run)
    return settled


def _write_plan_record(storage: Storage, job: ResolvedJob, plan: Plan, started: float, run_id: str,
                       pieces: int = 0) -> None:
    """`_runs/plan-<time>.json`: totals as planned, so `status` can tell rows left while a run
    goes on; written again (same name) with the `pieces` the tail's cuts added."""
    record = {
        "run": run_id,
        "started": started,
        "fingerprint": job.fingerprint,
        "total_rows": plan.total_rows,
        "total_shards": len(plan.done) + len(plan.todo) + pieces,
        "shards_todo": len(plan.todo) + pieces,
        "rows_todo": plan.rows_todo,
    }
    name = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started)) + f"-{os.getpid()}"
    storage.put_bytes(layout.plan_record_key(name), json.dumps(record, indent=2).encode())


def cost_line(job: ResolvedJob, manifest: Manifest, plan: Plan, storage: Storage) -> str:
    """What the job will cost, said before any work: rows, images, GPU-hours when known."""
    spec = job.spec
    images, images_todo = count_images(manifest, spec.num_images, plan.todo, job.variant)
    return estimate(plan.total_rows, images, images_todo, spec.gpu_seconds_per_image, storage,
                    run_key(spec.model, spec.defaults())).line()
