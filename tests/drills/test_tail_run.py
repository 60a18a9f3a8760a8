"""A run whose last shards are cut smaller (run/tail.py): two workers, every row committed once,
and the plan record counts the pieces."""

from __future__ import annotations

import json

from output_check import check_exactly_once
from test_job_e2e import make_manifest

from zimage_batch.inputs.manifest import open_manifest
from zimage_batch.jobspec import JobSpec
from zimage_batch.output.ledger import Ledger
from zimage_batch.run.driver import run_job
from zimage_batch.run.plan import make_plan
from zimage_batch.run.tail import cut_tail
from zimage_batch.storage import open_storage


def test_a_run_cuts_its_tail_commits_every_row_once_and_counts_the_pieces(tmp_path, ray_local):
    """`zimage-batch run` with two workers: the last shards run as pieces, every row is
    committed once, and the plan record (what `status` reads) counts the pieces."""
    manifest, out = tmp_path / "m.parquet", tmp_path / "out"
    ids = make_manifest(manifest, 400)
    job = JobSpec(manifest=str(manifest), output=str(out), model="tiny:turbo", workers=2, shard_size=200,
                  batch_size=16, report=False)
    summary = run_job(job, echo=lambda line: None)
    assert summary.exit_code == 0 and summary.rows_ok == 400
    check_exactly_once(str(out), ids)
    markers = Ledger(open_storage(str(out))).committed()
    expected = cut_tail(make_plan(open_manifest(str(manifest)), {}, 200).todo, 2)
    assert sorted((m.start, m.end) for m in markers.values()) == [(s.start, s.end) for s in expected]
    assert len(expected) > 2 and set(markers) == {s.name for s in expected}
    plan = json.loads(next((out / "_runs").glob("plan-*.json")).read_text())
    assert plan["total_shards"] == len(markers) == plan["shards_todo"]
