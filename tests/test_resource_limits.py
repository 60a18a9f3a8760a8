"""Runs that cannot store their output fail at once: before the model is fetched or Ray starts,
with a one-line `error:` and a non-zero exit. Covers a missing output bucket, a prefix whose
bucket policy denies writes, and a temp folder too small to stage one shard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import namedtuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from zimage_batch.cli import main
from zimage_batch.jobspec import JobSpec
from zimage_batch.run.output_store import check_scratch_space
from zimage_batch.run.preflight import resolve, scratch_needed
from zimage_batch.storage import MiB, StorageError, s3_client


@pytest.fixture
def manifest(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a fox", "a owl"]}), path)
    return str(path)


def _run_cli(args: list[str], ray_tmpdir: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zimage_batch.cli", "run", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "RAY_TMPDIR": ray_tmpdir})


def _assert_refused_early(result, ray_tmpdir: str, words: str) -> None:
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert words in result.stderr, result.stderr
    assert "plan:" not in result.stdout, "nothing may be planned"
    assert not os.listdir(ray_tmpdir), "Ray must not start"


def test_missing_output_bucket_fails_before_the_model_and_ray(s3_bucket, manifest, ray_tmpdir):
    # the model source is missing too: its error would show if the model were fetched first
    missing = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    result = _run_cli(["--manifest", manifest, "--output", f"s3://{missing}/out",
                       "--model", f"s3://{s3_bucket}/no-model/"], ray_tmpdir)
    _assert_refused_early(result, ray_tmpdir, f"bucket '{missing}' does not exist (s3://{missing}")


def test_prefix_denying_writes_fails_before_the_model_and_ray(s3_bucket, manifest, ray_tmpdir):
    s3_client().put_bucket_policy(Bucket=s3_bucket, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
                       "Resource": f"arn:aws:s3:::{s3_bucket}/locked/*"}],
    }))
    result = _run_cli(["--manifest", manifest, "--output", f"s3://{s3_bucket}/locked/out",
                       "--model", f"s3://{s3_bucket}/no-model/"], ray_tmpdir)
    _assert_refused_early(result, ray_tmpdir, f"access denied writing to s3://{s3_bucket}/locked/out")
    assert not list(s3_client().list_objects_v2(Bucket=s3_bucket).get("Contents", []))


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
