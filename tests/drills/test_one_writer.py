"""One writer per OUTPUT, drilled with real runs: a second run is refused (or waits its turn)
whatever its shard size; a run that lost its lease while paused cannot commit; overlapping
shards that older versions left are named by run/status/report and removed by `repair`.
Readers (DuckDB over metadata/) see every row exactly once throughout."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import time
from pathlib import Path

import duckdb
import pytest
from cli_in_process import cli_in_process
from test_fault_tolerance import _start_run, _wait_for_commits
from test_job_e2e import make_manifest

from zimage_batch.output import layout
from zimage_batch.output.ledger import Ledger
from zimage_batch.output.overlaps import find_overlaps
from zimage_batch.storage import open_storage


def ids_seen(out: Path) -> list[str]:
    """Every id DuckDB finds under metadata/ (what a reader globbing OUTPUT sees)."""
    files = sorted(glob.glob(f"{out}/metadata/*.parquet"))
    return [row[0] for row in duckdb.sql(f"SELECT id FROM read_parquet({files!r})").fetchall()] if files else []


def assert_exactly_once(out: Path, ids: list[str]) -> None:
    seen = ids_seen(out)
    assert sorted(seen) == sorted(ids), f"{len(seen)} rows for {len(ids)} ids"
    assert find_overlaps(Ledger(open_storage(str(out))).committed().values()) == []
    assert not os.path.exists(out / layout.LEASE), "the lease is released at the end"


def _run_args(manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--manifest", str(manifest), "--output", str(out), "--model", "tiny:turbo", "--format", "parquet",
            "--set", "report=false", *extra]


@pytest.mark.parametrize("first, second", [(5, 3), (3, 5)])
def test_a_second_run_is_refused_then_waits_its_turn_whatever_its_shard_size(tmp_path, ray_local, first, second):
    manifest, out = tmp_path / "m.parquet", tmp_path / "out"
    ids = make_manifest(manifest, 60)
    holder = _start_run(manifest, out, "--shard-size", str(first), "--batch-size", "1", "--format", "parquet",
                        "--set", "report=false")
    try:
        _wait_for_commits(out, 1, holder)
        refused = cli_in_process(*_run_args(manifest, out, "--shard-size", str(second)))
        assert refused.returncode == 2, refused.stdout + refused.stderr
        line = refused.stderr.strip()
        assert "\n" not in line and "is being written by run" in line and f"pid {holder.pid}" in line, line
        assert "expires in" in line and "--wait" in line
        waited = cli_in_process(*_run_args(manifest, out, "--shard-size", str(second), "--wait"))
        assert waited.returncode == 0, waited.stdout + waited.stderr
        assert "waiting for run" in waited.stdout
        stdout, stderr = holder.communicate(timeout=120)
        assert holder.returncode == 0, stdout + stderr
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
    assert_exactly_once(out, ids)


def test_a_paused_holder_that_wakes_after_a_takeover_commits_nothing(tmp_path, ray_local):
    manifest, out = tmp_path / "m.parquet", tmp_path / "out"
    ids = make_manifest(manifest, 64)  # 16 shards: the holder is paused after its first
    stale = _start_run(manifest, out, "--shard-size", "4", "--batch-size", "1", "--format", "parquet",
                       "--set", "report=false", "--set", "lease_ttl=3", "--set", "lease_renew_interval=1")
    try:
        _wait_for_commits(out, 1, stale)
        os.kill(stale.pid, signal.SIGSTOP)  # the driver freezes; its workers finish what they hold
        paused = time.time()
        taker = cli_in_process(*_run_args(manifest, out, "--shard-size", "7", "--wait"))
        assert taker.returncode == 0, taker.stdout + taker.stderr
        assert "took over the lease" in taker.stdout and "expired" in taker.stdout
        assert time.time() - paused < 90
        os.kill(stale.pid, signal.SIGCONT)
        stdout, stderr = stale.communicate(timeout=120)
    finally:
        if stale.poll() is None:
            os.kill(stale.pid, signal.SIGCONT)
            os.killpg(stale.pid, signal.SIGKILL)
    assert stale.returncode == 1, stdout + stderr
    assert "lost the lease" in stderr or "no longer this run's" in stderr or "taken over" in stderr, stderr
    assert_exactly_once(out, ids)


def test_overlapping_shards_are_named_refused_and_repaired(tmp_path, ray_local):
    """An OUTPUT as two runs without a lease left it: shards of sizes 4 and 5 over the same rows."""
    manifest, out, other = tmp_path / "m.parquet", tmp_path / "out", tmp_path / "other"
    ids = make_manifest(manifest, 12)
    for folder, size in ((out, "4"), (other, "5")):
        result = cli_in_process(*_run_args(manifest, folder, "--shard-size", size))
        assert result.returncode == 0, result.stdout + result.stderr
    late = next(m for m in Ledger(open_storage(str(other))).committed().values() if m.start == 5)
    for key in (layout.metadata_key(late.shard), layout.parquet_key(late.shard), layout.commit_key(late.shard)):
        shutil.copyfile(other / key, out / key)  # committed last, by "another run"
    assert len(ids_seen(out)) == 17  # what a reader sees: 5 rows twice

    status = cli_in_process("status", str(out))
    assert status.returncode == 1
    assert "overlaps" in status.stderr and f"zimage-batch repair {out}" in status.stderr
    assert "12 of 12 done (100%)" in status.stdout, status.stdout
    figures = json.loads(cli_in_process("status", str(out), "--json").stdout)
    assert figures["rows_done"] == 12 and figures["overlaps"]
    assert cli_in_process("report", str(out)).returncode == 1

    refused = cli_in_process(*_run_args(manifest, out, "--shard-size", "4"))
    assert refused.returncode == 2 and "zimage-batch repair" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    repaired = cli_in_process("repair", str(out))
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert f"removed shard {late.shard} (rows 5..9)" in repaired.stdout
    assert sorted(ids_seen(out)) == sorted(ids)  # each row once again
    assert cli_in_process("repair", str(out)).stdout.strip().endswith("nothing to repair")

    rerun = cli_in_process(*_run_args(manifest, out, "--shard-size", "4"))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_exactly_once(out, ids)
