"""ShardRunner in-process (no Ray): what a failed attempt leaves behind; its CPU threads."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zimage_batch.jobspec import load_job
from zimage_batch.output.ledger import Ledger
from zimage_batch.run.generation import ShardGeneration
from zimage_batch.run.plan import make_plan
from zimage_batch.run.pool import cpu_threads_per_worker, cpu_threads_setting
from zimage_batch.run.preflight import job_record, prepare
from zimage_batch.run.worker import ShardRunner
from zimage_batch.storage import open_storage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _one_shard_runner(tmp_path, rows: int) -> tuple[ShardRunner, object]:
    """A claimed OUTPUT, a manifest of `rows` rows in one shard, and a worker for it (in-process)."""
    records = [{"id": f"row-{i:02d}", "prompt": f"a cat {i}", "seed": i} for i in range(rows)]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "m.parquet")
    job = load_job(None, {"manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "out"),
                          "model": "tiny:turbo", "shard_size": rows, "batch_size": 4}, ["report=false"])
    prepared = prepare(job)
    resolved = prepared.job
    Ledger(open_storage(job.output)).claim_output(job_record(resolved), False)
    (shard,) = make_plan(prepared.manifest, {}, job.shard_size, resolved.variant).todo
    return ShardRunner(resolved.worker_settings(resolved.variant)), shard


def test_failed_attempt_waits_for_its_stores_before_the_writer_is_aborted(tmp_path, monkeypatch):
    """Generation fails on the third batch while earlier images are still being stored. The
    attempt must not return (and abort its writer) while one of its stores is running: nothing
    of a failed attempt may touch storage after it, when a new attempt may be cleaning up."""
    runner, shard = _one_shard_runner(tmp_path, 12)

    real_store, real_generate = ShardGeneration._store, runner.engine.generate
    calls = {"generate": 0}

    finished: list[float] = []

    def slow_store(*args, **kwargs):
        time.sleep(0.3)
        try:
            return real_store(*args, **kwargs)
        finally:
            finished.append(time.monotonic())

    def failing_generate(batch, batch_size=8):
        calls["generate"] += 1
        if calls["generate"] == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return real_generate(batch, batch_size)

    monkeypatch.setattr(ShardGeneration, "_store", slow_store)
    runner.engine.generate = failing_generate
    with pytest.raises(RuntimeError, match="injected"):
        runner.run_shard(shard)
    returned = time.monotonic()
    out = tmp_path / "out"
    files = lambda: sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "job.json")  # noqa: E731
    assert files() == [], "the failed attempt's staged files must be removed"
    time.sleep(1.0)  # a store still running would land now
    assert finished and max(finished) <= returned, "a store of the failed attempt ran on after it returned"
    assert files() == [], "a store of the failed attempt wrote after it returned"
    assert not (tmp_path / "out" / "_commits").exists() or not any((tmp_path / "out" / "_commits").iterdir())


def test_cpu_workers_share_the_cores_unless_the_job_environment_says():
    cores = os.cpu_count() or 2
    unset = cpu_threads_setting({})
    assert cpu_threads_per_worker(1, unset) == cores and cpu_threads_per_worker(cores * 2, unset) == 1
    assert cpu_threads_per_worker(1, cpu_threads_setting({"OMP_NUM_THREADS": "1"})) == cores  # Ray's, in Ray Jobs drivers
    assert cpu_threads_per_worker(1, cpu_threads_setting({"ZIMAGE_BATCH_CPU_THREADS": " 3 "})) == 3
    for bad in ("0", "x", "²", "2,1"):
        with pytest.raises(ValueError, match="ZIMAGE_BATCH_CPU_THREADS must be a whole number"):
            cpu_threads_setting({"ZIMAGE_BATCH_CPU_THREADS": bad})


def test_a_worker_whose_run_lost_the_lease_commits_nothing(tmp_path, monkeypatch):
    """The fence: before its commit, and again before publishing, an attempt reads OUTPUT's lease;
    a run that no longer holds it (another run took it over while this one was paused) neither
    commits nor publishes."""
    import dataclasses

    from zimage_batch.output import layout
    from zimage_batch.output.lease import Lease, LeaseLost

    rows = [{"id": f"row-{i}", "prompt": f"a cat {i}", "seed": i} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    job = load_job(None, {"manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "out"),
                          "model": "tiny:turbo", "shard_size": 2, "batch_size": 2}, ["report=false"])
    prepared = prepare(job)
    resolved = prepared.job
    storage = open_storage(job.output)
    Ledger(storage).claim_output(job_record(resolved), False)
    first, second = make_plan(prepared.manifest, {}, job.shard_size, resolved.variant).todo
    Lease(storage, "run-b", echo=lambda line: None).acquire()  # run-b took OUTPUT over
    runner = ShardRunner(dataclasses.replace(resolved.worker_settings(resolved.variant), run="run-a"))

    with pytest.raises(LeaseLost, match="run-b"):
        runner.run_shard(first)
    assert Ledger(storage).committed() == {} and list(storage.list(layout.STAGING)) == []

    # Lost between the look and the commit: the marker stays, unpublished, for the holder to judge.
    checks = iter([None])

    def fence_passes_once(storage_, run):
        if next(checks, "lost") == "lost":
            raise LeaseLost("taken over meanwhile")

    monkeypatch.setattr("zimage_batch.run.worker.check_fence", fence_passes_once)
    with pytest.raises(LeaseLost):
        runner.run_shard(second)
    (marker,) = Ledger(storage).committed().values()
    assert marker.shard == second.name and marker.run == "run-a"
    assert Ledger(storage).published_shards() == set()  # never published by the run that lost


def test_an_attempt_at_a_committed_shard_answers_with_the_winners_marker(tmp_path):
    """A copy that lost (or a retry whose first attempt's answer was lost) answers with the
    marker the shard is committed under, so the run's progress counts the shard once."""
    runner, shard = _one_shard_runner(tmp_path, 4)
    won = runner.run_shard(shard)
    assert won is not None and won.ok == 4
    again = runner.run_shard(shard)
    assert again is not None and (again.shard, again.token, again.ok) == (won.shard, won.token, 4)


def test_the_progress_counts_each_shard_once_whichever_attempt_answers():
    from zimage_batch.output.ledger import CommitMarker
    from zimage_batch.run.driver import _account
    from zimage_batch.run.progress import Progress

    progress, counted = Progress(8, 1, 60.0, echo=lambda line: None), set()
    marker = CommitMarker(shard="s0", file="m.parquet", start=0, end=4, rows=4, ok=4, error=0, digest="d",
                          fingerprint="f", format="files")
    for answer in (marker, marker, None):
        _account(progress, counted, answer)
    assert (progress.done, progress.images) == (4, 4)
