"""Runs that cannot stage their output fail at once: the scratch space one shard needs, and a
temp folder too small for it refused in one `error:` line before OUTPUT is claimed or Ray starts.
A missing bucket and a prefix denying writes: tests/drills/test_unwritable_output.py."""

from __future__ import annotations

import shutil
import time
from collections import namedtuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from zimage_batch.cli import main
from zimage_batch.jobspec import JobSpec
from zimage_batch.run.output_store import check_scratch_space
from zimage_batch.run.preflight import resolve, scratch_needed
from zimage_batch.storage import MiB, StorageError


@pytest.fixture
def manifest(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a fox", "a owl"]}), path)
    return str(path)


# ------------------------------------------------------------------ local scratch space
def test_scratch_needed_follows_format_size_and_shard_size():
    png = JobSpec(manifest="m", output="o", model="tiny:turbo", variant="turbo", format="webdataset",
                  width=512, height=512, shard_size=100)
    assert scratch_needed(resolve(png)) == 100 * (512 * 512 * 3 + 1024)
    jpeg = JobSpec(**{**png.to_dict(), "image_format": "jpeg", "format": "parquet"})
    assert scratch_needed(resolve(jpeg)) == 100 * (512 * 512 + 1024)
    assert scratch_needed(resolve(JobSpec(**{**png.to_dict(), "format": "files"}))) == 0
    big = JobSpec(**{**png.to_dict(), "width": 1024, "height": 1024, "shard_size": 1000})
    assert 3000 * MiB < scratch_needed(resolve(big)) < 3100 * MiB  # the defaults of a real run: ~3 GiB


DiskUsage = namedtuple("DiskUsage", "total used free")


def test_check_scratch_space(monkeypatch, tmp_path):
    check_scratch_space(1024, str(tmp_path))  # the real disk has a KiB
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(100 * MiB, 90 * MiB, 10 * MiB))
    check_scratch_space(10 * MiB, str(tmp_path))
    check_scratch_space(0, str(tmp_path))
    with pytest.raises(StorageError, match=r"not enough scratch space in .*: 10 MiB free, a shard needs about 11 MiB"):
        check_scratch_space(11 * MiB, str(tmp_path))


def test_run_with_too_little_scratch_space_fails_first(monkeypatch, tmp_path, manifest):
    """One line, before OUTPUT is claimed or Ray starts; --format files stages nothing."""
    import ray

    seen = []

    def disk_usage(path):
        seen.append(path)
        return DiskUsage(100 * MiB, 99 * MiB, 1 * MiB)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    out = tmp_path / "out"
    args = ["run", "--manifest", manifest, "--output", str(out), "--model", "tiny:turbo",
            "--format", "webdataset", "--shard-size", "1000"]
    started = time.time()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and not ray.is_initialized(), result.output
    assert result.stderr.startswith("error: not enough scratch space in ") and result.stderr.count("\n") == 1
    assert "set TMPDIR" in result.stderr and not result.stdout and seen
    assert not (out / "job.json").exists() and time.time() - started < 60
