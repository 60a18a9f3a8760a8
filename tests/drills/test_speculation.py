"""The speculative tail on a real cluster: one of two CPU workers is slowed ten-fold; the fast
one runs second copies of its shards, the first commit wins, the slowed copies stop and remove
their staged files, and every row is there exactly once."""

from __future__ import annotations

from output_check import check_exactly_once
from test_fault_tolerance import _start_run
from test_job_e2e import make_manifest

from zimage_batch.output.ledger import Ledger
from zimage_batch.run.worker import SLOW_WORKER_ENV
from zimage_batch.storage import open_storage

SLOWDOWN = 10


def test_a_slowed_worker_does_not_hold_up_the_end_and_every_row_is_there_once(tmp_path):
    manifest, out = tmp_path / "m.parquet", tmp_path / "out"
    ids = make_manifest(manifest, 20)
    proc = _start_run(manifest, out, "--workers", "2", "--shard-size", "5", "--batch-size", "1",
                      "--set", "report=false", env={SLOW_WORKER_ENV: str(SLOWDOWN), "ZIMAGE_BATCH_CPU_THREADS": "1"})
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]
    check_exactly_once(str(out), ids)  # each id once, no staged file left behind
    markers = list(Ledger(open_storage(str(out))).committed().values())
    by_worker: dict[str, list] = {}
    for m in markers:
        by_worker.setdefault(m.worker, []).append(m)
    fast = max(by_worker.values(), key=len)
    shard_s = sorted(m.finished - m.started for m in fast)[len(fast) // 2]
    window = max(m.finished for m in markers) - min(m.started for m in markers)
    # The slowed worker alone would take SLOWDOWN x a shard for each of its two shards; the copies
    # bring the end near the fast worker's pace (four shards).
    assert len(fast) >= 3, [(m.shard, m.worker) for m in markers]
    assert window < SLOWDOWN * shard_s, (window, shard_s)
