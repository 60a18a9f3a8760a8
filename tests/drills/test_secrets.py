"""Credentials are never printed or written: not by the CLI, not in Ray's logs, not in OUTPUT.

Recognisable secrets are planted as AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (the test S3
server accepts any) and HF_TOKEN; then jobs run on S3 through the CLI, each with its own Ray
temp folder: one whose second shard is refused its commit marker (so workers fail and log
errors), one whose output bucket does not exist, one with a bad manifest. Everything those
runs printed or left behind is searched for the secrets.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zimage_batch.storage import open_storage, s3_client

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": f"zbSecretKey{uuid.uuid4().hex}",
    "AWS_SESSION_TOKEN": f"zbSessionToken{uuid.uuid4().hex}",
    "HF_TOKEN": f"hf_zbToken{uuid.uuid4().hex}",
}
# Forwarded to Ray workers like any non-secret setting: proves the search reaches where they go.
CANARY = ("ZIMAGE_BATCH_TEST_CANARY", f"zbCanary{uuid.uuid4().hex}")


def _manifest(path: Path, ids: list[str]) -> None:
    pq.write_table(pa.table({"id": ids, "prompt": [f"a quiet harbour {i}" for i in ids]}), path)


@pytest.fixture(scope="module")
def runs(s3_server, tmp_path_factory):
    """Run the jobs once; returns {name: CompletedProcess}, the Ray/scratch folders and buckets."""
    tmp = tmp_path_factory.mktemp("secrets")
    ray_tmp = tempfile.mkdtemp(prefix="zbray-", dir="/tmp")  # short: Ray puts sockets in it
    scratch = tmp / "scratch"
    scratch.mkdir()
    bucket = f"secrets-{uuid.uuid4().hex[:16]}"
    client = s3_client()
    client.create_bucket(Bucket=bucket)
    # the second shard (rows 20..39) may not commit: its worker fails and says why
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
                       "Resource": f"arn:aws:s3:::{bucket}/out/_commits/*-0000000020.json"}],
    }))
    manifests = open_storage(f"s3://{bucket}/manifests")
    _manifest(tmp / "good.parquet", [f"row-{i:03d}" for i in range(40)])
    _manifest(tmp / "dup.parquet", ["same", "same", "other"])
    manifests.put_file("good.parquet", tmp / "good.parquet")
    manifests.put_file("dup.parquet", tmp / "dup.parquet")

    env = {**os.environ, **SECRETS, CANARY[0]: CANARY[1], "RAY_TMPDIR": ray_tmp, "TMPDIR": str(scratch)}
    base = ["--model", "tiny:turbo", "--shard-size", "20", "--set", "max_attempts=1"]
    jobs = {
        "partly_failing": ["--manifest", f"s3://{bucket}/manifests/good.parquet", "--output", f"s3://{bucket}/out"],
        "missing_bucket": ["--manifest", f"s3://{bucket}/manifests/good.parquet",
                           "--output", f"s3://no-such-bucket-{uuid.uuid4().hex[:12]}/out"],
        "bad_manifest": ["--manifest", f"s3://{bucket}/manifests/dup.parquet", "--output", f"s3://{bucket}/out-bad"],
    }
    results = {
        name: subprocess.run([sys.executable, "-m", "zimage_batch.cli", "run", *args, *base],
                             capture_output=True, text=True, env=env, timeout=600)
        for name, args in jobs.items()
    }
    yield {"results": results, "ray_tmp": Path(ray_tmp), "scratch": scratch, "bucket": bucket}
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_the_jobs_ran_as_expected(runs):
    results = runs["results"]
    partly = results["partly_failing"]
    assert partly.returncode == 1, partly.stderr
    assert "done: 20 ok, 0 error of 40 rows; 1 shard committed" in partly.stdout, partly.stdout
    assert "access denied" in partly.stderr and "failed shard" in partly.stderr
    for name in ("missing_bucket", "bad_manifest"):
        result = results[name]
        assert result.returncode != 0 and result.stderr.startswith("error: "), result.stderr
    assert "does not exist" in results["missing_bucket"].stderr
    assert "same" in results["bad_manifest"].stderr


def _everything_written(runs) -> dict[str, bytes]:
    """Each place a run printed or wrote to, by name: CLI output, Ray's session folder (logs and
    all), local scratch space, and every object in the bucket (OUTPUT and its records)."""
    found: dict[str, bytes] = {}
    for name, result in runs["results"].items():
        found[f"{name}:stdout"] = result.stdout.encode()
        found[f"{name}:stderr"] = result.stderr.encode()
    for root in (runs["ray_tmp"], runs["scratch"]):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                found[str(path)] = path.read_bytes()
    store = open_storage(f"s3://{runs['bucket']}")
    for info in store.list():
        found[f"s3://{runs['bucket']}/{info.key}"] = store.get_bytes(info.key)
    return found


def test_no_secret_is_printed_or_written(runs):
    found = _everything_written(runs)
    # the search covers what the runs left: Ray's logs, job.json, metadata, markers, run records
    names = list(found)
    assert any(n.endswith("runtime_env_agent.log") for n in names), names
    assert any("/logs/worker-" in n for n in names) and any(n.endswith("/out/job.json") for n in names)
    for part in ("/out/metadata/", "/out/_commits/", "/out/_runs/", "/out/images/"):
        assert any(part in n for n in names), f"nothing under {part}"
    # a non-secret setting forwarded to the workers is found where Ray logs it: the search works
    assert any(CANARY[1].encode() in data for name, data in found.items() if "runtime_env" in name)

    for variable, secret in SECRETS.items():
        leaks = [name for name, data in found.items() if secret.encode() in data]
        assert not leaks, f"{variable} found in {leaks}"
