"""Exactly-once commits need create-only writes (``If-None-Match: *``). A store that
ignores the header (s3rver, older MinIO, some Ceph and hosted stores answer 200 to both of two
create-only PUTs) is found by a probe before any work and refused in one line, unless the job
opts out with ``unsafe_allow_overwriting_commits``, which job.json records.

The store that ignores the header is the moto test server behind a proxy that drops it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fault_proxy import FaultProxy, endpoint_env
from output_check import check_exactly_once, load_json

from zimage_batch.jobspec import JobSpec
from zimage_batch.run.output_store import check_output_store
from zimage_batch.run.preflight import resolve
from zimage_batch.storage import (
    LocalStorage,
    S3Storage,
    StorageError,
    open_storage,
    s3_client,
)

OPT_OUT = "unsafe_allow_overwriting_commits"


@pytest.fixture
def ignoring_store(s3_server):
    """An endpoint in front of the S3 test server that never forwards If-None-Match."""
    with FaultProxy(s3_server, drop_headers=("If-None-Match",)) as proxy:
        yield proxy.url


def _bucket_keys(bucket: str) -> list[str]:
    return [o["Key"] for o in s3_client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_proxy_really_drops_the_condition(s3_bucket, ignoring_store):
    """The premise: through the proxy both create-only writes of one key succeed; direct, not."""
    store = S3Storage(f"s3://{s3_bucket}/premise")
    assert store.put_if_absent("k", b"1") and not store.put_if_absent("k", b"2")
    with endpoint_env(ignoring_store):
        assert store.put_if_absent("j", b"1") and store.put_if_absent("j", b"2")
        assert store.get_bytes("j") == b"2"  # the second write replaced the first


def test_probe_passes_on_a_store_that_enforces_it(s3_bucket):
    store = S3Storage(f"s3://{s3_bucket}/out")
    assert store.supports_create_only() is True
    check_output_store(store)
    assert _bucket_keys(s3_bucket) == []  # the scratch keys are gone


def test_probe_fails_on_a_store_that_ignores_it(s3_bucket, ignoring_store):
    store = S3Storage(f"s3://{s3_bucket}/out")
    with endpoint_env(ignoring_store):
        assert store.supports_create_only() is False
        with pytest.raises(StorageError) as refused:
            check_output_store(store)
        check_output_store(store, allow_overwriting_commits=True)  # the opt-out: no error
    message = str(refused.value)
    assert "\n" not in message
    assert ignoring_store in message and "If-None-Match" in message and f"--set {OPT_OUT}=true" in message
    assert _bucket_keys(s3_bucket) == []


def test_a_store_that_ignores_if_match_is_refused_for_the_lease(s3_bucket, s3_server):
    """Compare-and-swap (PutObject If-Match) is what keeps two runs from both taking over a lease."""
    store = S3Storage(f"s3://{s3_bucket}/out")
    assert store.supports_compare_and_swap() is True
    with FaultProxy(s3_server, drop_headers=("If-Match",)) as proxy, endpoint_env(proxy.url):
        assert store.supports_compare_and_swap() is False
        with pytest.raises(StorageError) as refused:
            check_output_store(store)
    message = str(refused.value)
    assert "\n" not in message and "If-Match" in message and "lease" in message and OPT_OUT in message
    assert _bucket_keys(s3_bucket) == []


def test_local_storage_is_create_only(tmp_path):
    store = LocalStorage(tmp_path / "out")
    assert store.supports_create_only() is True
    check_output_store(store)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_opt_out_is_a_job_setting_outside_the_fingerprint():
    """Existing OUTPUTs keep their fingerprint; the setting decides nothing about what they hold."""
    assert OPT_OUT not in JobSpec.OUTPUT_FIELDS
    plain, unsafe = JobSpec(), JobSpec(**{OPT_OUT: True})
    assert getattr(plain, OPT_OUT) is False  # what job.json records unless the job opts out
    assert plain.fingerprint() == unsafe.fingerprint()


def _run(manifest, output: str, ray_tmpdir: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zimage_batch.cli", "run", "--manifest", str(manifest), "--output", output,
         "--model", "tiny:turbo", "--set", "report=false", *extra],
        capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_TMPDIR": ray_tmpdir},
        stdin=subprocess.DEVNULL,
    )


def test_run_refused_before_any_work_then_opt_out_runs(s3_bucket, ignoring_store, tmp_path, ray_tmpdir):
    manifest = tmp_path / "m.parquet"
    ids = ["a", "b", "c"]
    pq.write_table(pa.table({"id": ids, "prompt": ["a cat", "a dog", "a fox"]}), manifest)

    with endpoint_env(ignoring_store):
        refused = _run(manifest, f"s3://{s3_bucket}/refused", ray_tmpdir)
    assert refused.returncode != 0, refused.stdout + refused.stderr
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), refused.stderr
    assert ignoring_store in lines[0] and OPT_OUT in lines[0] and "Traceback" not in refused.stderr
    assert "plan:" not in refused.stdout  # nothing planned, no worker started
    assert _bucket_keys(s3_bucket) == []  # nothing written at all

    with endpoint_env(ignoring_store):
        unsafe = _run(manifest, f"s3://{s3_bucket}/unsafe", ray_tmpdir, "--set", f"{OPT_OUT}=true")
    assert unsafe.returncode == 0, unsafe.stdout + unsafe.stderr
    assert "ignores create-only writes" in unsafe.stderr and OPT_OUT in unsafe.stderr  # said, not silent
    # (the probe passes on moto itself: every other S3 drill runs through it)

    unsafe_job = load_json(f"s3://{s3_bucket}/unsafe", "job.json")
    plain = JobSpec(manifest=str(manifest), output=f"s3://{s3_bucket}/plain", model="tiny:turbo", report=False)
    assert unsafe_job["job"][OPT_OUT] is True and unsafe_job["fingerprint"] == resolve(plain).fingerprint
    rows = check_exactly_once(f"s3://{s3_bucket}/unsafe", ids)
    assert {r["status"] for r in rows} == {"ok"}
    assert not any(k.split("/", 2)[1] == "_probe" for k in _bucket_keys(s3_bucket))
    assert not list(open_storage(f"s3://{s3_bucket}/refused").list())
