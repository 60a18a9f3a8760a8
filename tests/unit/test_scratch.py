"""Temporary files live in one folder per process: removed on SIGINT/SIGTERM, and by the next
worker on the node once their owner is dead (SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from zimage_batch import scratch
from zimage_batch.output.writers import make_writer
from zimage_batch.storage import open_storage

OWNER = """
import sys, time
from pathlib import Path
from zimage_batch import scratch
scratch.claim(signals=True)
tar = Path(scratch.mkdtemp("zimage-wds-")) / "shard.tar"  # a writer's file, half written
tar.write_bytes(b"x" * 1000)
print(tar, flush=True)
time.sleep(120)
"""


@pytest.fixture
def tmpdir_here(tmp_path, monkeypatch):
    """TMPDIR (and tempfile's cached copy of it) pointing at the test's folder."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _start_owner() -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=dict(os.environ))
    tar = Path(proc.stdout.readline().strip())
    path = tar.parent.parent
    assert tar.is_file() and (path / scratch.OWNER_FILE).is_file()
    return proc, path


def test_the_scratch_of_a_killed_worker_is_removed_by_the_next_one(tmpdir_here):
    proc, path = _start_owner()
    assert path.parent == tmpdir_here / scratch.ROOT_NAME
    assert scratch.sweep_dead() == []  # its owner lives: kept
    proc.kill()
    proc.wait(timeout=30)
    assert path.is_dir()  # a SIGKILL removes nothing
    assert scratch.sweep_dead() == [path] and not path.exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_remove_the_scratch(tmpdir_here, signum):
    proc, path = _start_owner()
    proc.send_signal(signum)
    assert proc.wait(timeout=30) != 0  # the signal still ends the process
    assert not path.exists()


def test_a_reused_pid_is_told_apart_and_other_hosts_are_left_alone(tmpdir_here):
    root = tmpdir_here / scratch.ROOT_NAME
    owners = {
        "reused": {"host": scratch.HOST, "pid": os.getpid(), "started": "not-our-start-time"},
        "alive": {"host": scratch.HOST, "pid": os.getpid(), "started": scratch.process_start_time(os.getpid())},
        "elsewhere": {"host": "another-node", "pid": 1, "started": None},
    }
    for name, owner in owners.items():
        (root / name).mkdir(parents=True)
        (root / name / scratch.OWNER_FILE).write_text(json.dumps(owner))
    assert scratch.sweep_dead() == [root / "reused"]
    assert sorted(p.name for p in root.iterdir()) == ["alive", "elsewhere"]


def test_writers_build_their_files_in_the_process_scratch_and_leave_nothing(tmp_path, tmpdir_here):
    for fmt in ("webdataset", "parquet"):
        writer = make_writer(fmt, open_storage(str(tmp_path / fmt)), "s1")
        process_folder = Path(writer._tmpdir).parent
        assert process_folder.parent == tmpdir_here / scratch.ROOT_NAME
        writer.add("k1", b"png", {"id": "1", "prompt": "p"})
        writer.close()
        assert (tmp_path / fmt / writer.object).is_file()
        assert not process_folder.exists()  # the last writer done: the process's folder goes too
