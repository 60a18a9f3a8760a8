"""A worker that stops making progress is replaced, end to end on real Ray: its process is
SIGSTOPped (what a wedged GPU, a hung collective or a stuck socket look like from outside) while
it generates, and the run still ends exit 0 with every row exactly once. The policy behind it
(the timeout, who is charged, the line) is unit-tested against a fake pool in test_scheduler.py."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import psutil
from output_check import check_exactly_once
from test_fault_tolerance import _start_run, _wait_for_commits, _worker_processes
from test_job_e2e import make_manifest

STALL_TIMEOUT = 15  # longer than any one step of a shard takes here, even on a loaded 2-core machine


def _lines_with_times(stream, into: list[tuple[float, str]]) -> threading.Thread:
    """Read `stream` line by line on a thread, each line with the monotonic time it arrived."""
    def read() -> None:
        for line in stream:
            into.append((time.monotonic(), line.rstrip("\n")))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_a_sigstopped_worker_is_replaced_and_every_row_committed_once(tmp_path):
    manifest, out = tmp_path / "m.parquet", tmp_path / "out"
    ids = make_manifest(manifest, 40)
    # One worker: the run can only end if the stopped one is replaced.
    started = time.monotonic()
    proc = _start_run(manifest, out, "--workers", "1", "--shard-size", "5", "--set", f"stall_timeout={STALL_TIMEOUT}",
                      "--set", "report=false")
    lines: list[tuple[float, str]] = []
    errors: list[tuple[float, str]] = []
    readers = [_lines_with_times(proc.stdout, lines), _lines_with_times(proc.stderr, errors)]  # no pipe fills up
    stopped: list[psutil.Process] = []
    try:
        _wait_for_commits(out, 1, proc)  # generating: its model is loaded and shards are going through
        first_commit = time.monotonic() - started  # Ray's start, a worker's, a shard: how loaded this machine is
        workers = _worker_processes(proc.pid)
        assert len(workers) == 1, f"expected one worker actor process, found {workers}"
        workers[0].send_signal(signal.SIGSTOP)
        stopped.append(workers[0])
        frozen_at = time.monotonic()
        proc.wait(timeout=300)
        ended = time.monotonic()
        for reader in readers:
            reader.join(timeout=10)
        assert proc.returncode == 0, "\n".join(line for _, line in errors)[-3000:]
        stalls = [(t, line) for t, line in lines if "made no progress" in line]
        assert len(stalls) == 1, [line for _, line in lines]
        seen, line = stalls[0]
        assert line.startswith("worker 0 (") and f":{workers[0].pid}) made no progress for " in line, line
        assert " on shard " in line and line.endswith(("replacing it and retrying the shard",
                                                       "replacing it and retrying both")), line
        # noticed once stall_timeout passed since the last progress (which may predate the SIGSTOP),
        # at a heartbeat check a second or so later, not at the end of the run
        assert int(re.search(r"made no progress for (\d+)s", line)[1]) >= STALL_TIMEOUT, line
        assert 0 < seen - frozen_at <= STALL_TIMEOUT + 15, seen - frozen_at
        # then a fresh worker's start and the few small shards left: less than the first commit took
        assert ended - frozen_at <= STALL_TIMEOUT + 15 + first_commit, (ended - frozen_at, first_commit)
        _, alive = psutil.wait_procs(stopped, timeout=30)
        assert not alive, "the stalled worker's process was not killed"
    finally:
        for p in stopped:  # never leave a stopped process behind
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
            except psutil.Error:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    rows = check_exactly_once(str(out), ids)  # each id once in committed metadata, no staged file listed
    assert len(rows) == 40 and len(list((out / "_commits").glob("*.json"))) == 8
    # Nor any folder or file the killed attempt staged (it may have been stopped mid-publish, or
    # mid-write: the storage's hidden temporary file), once the run's end sweep is done.
    left = list((out / "_staging").rglob("*"))
    assert left == [], f"staging left behind: {left}"
