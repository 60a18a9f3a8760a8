"""Runs whose output cannot be written fail at once, in a real process: before the model is fetched or Ray
starts, with a one-line `error:` and a non-zero exit (a missing output bucket, a prefix whose bucket
policy denies writes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zimage_batch.storage import s3_client


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
