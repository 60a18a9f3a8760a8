"""The job outlives its parts, end to end on real Ray: SIGTERM and its grace period. A killed
worker (replaced, its shard retried, every row once) and a killed driver (resumed) are drilled
in test_readers_see_committed.py (rows of several images each), which also reads what they left.

The rules behind them (retries, suspects, give-up, the grace period, workers that cannot start,
a lost node's workers) are unit-tested against a fake pool in test_scheduler.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from output_check import check_exactly_once
from test_job_e2e import make_manifest


def _commits(out: Path) -> int:
    return len(list((out / "_commits").glob("*.json"))) if (out / "_commits").exists() else 0


def _wait_for_commits(out: Path, n: int, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while _commits(out) < n:
        assert time.time() < deadline, f"fewer than {n} shards committed in {timeout}s"
        assert proc is None or proc.poll() is None, "the run ended early"
        time.sleep(0.05)


def _start_run(manifest: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "zimage_batch.cli", "run", "--manifest", str(manifest), "--output", str(out),
         "--model", "tiny:turbo", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def _worker_processes(driver_pid: int) -> list[psutil.Process]:
    """The Ray actor processes running ShardRunner (Ray names their process titles after the actor)
    under this driver: its local cluster's processes descend from it. Another job's workers on
    this machine are not ours to kill."""
    found = []
    for p in psutil.Process(driver_pid).children(recursive=True):
        try:
            if any("ShardRunner" in part for part in p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_sigterm_stops_within_grace_period_and_resumes(tmp_path):
    manifest, out = tmp_path / "m.parquet", tmp_path / "out"
    ids = make_manifest(manifest, 120)
    proc = _start_run(manifest, out, "--workers", "2", "--shard-size", "10", "--set", "grace_period=30")
    try:
        _wait_for_commits(out, 2, proc)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=90)
        assert time.time() - sent < 45, "the driver must exit within the grace period"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "stopping" in stdout
    assert _commits(out) < 12, "the stop should land mid-run"
    rerun = _start_run(manifest, out, "--shard-size", "10")  # the worker count is not part of the job
    rerun.communicate(timeout=300)
    assert rerun.returncode == 0
    check_exactly_once(str(out), ids)
