"""Flaky storage: throttling, 5xx and dropped connections are retried and lose nothing.

Everything here talks to the real moto S3 server through tests/fault_proxy.py, which answers
a share of requests with 503 SlowDown, 500 InternalError, connection resets (before the
request reaches S3, or after: the answer lost), cut-off answers and slow answers.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fault_proxy import KINDS, endpoint_env
from output_check import check_exactly_once

from zimage_batch.output.layout import commit_key
from zimage_batch.output.ledger import CommitMarker, Ledger
from zimage_batch.storage import S3Storage, open_storage

# Any credentials do for the test server, but requests must carry an Authorization header.
_AUTH = {"Authorization": "AWS4-HMAC-SHA256 Credential=testing/20250101/us-east-1/s3/aws4_request, "
                          "SignedHeaders=host, Signature=0"}


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_proxy_forwards_chunked_bodies_head_and_conditional_puts(flaky_s3, s3_bucket):
    conn = http.client.HTTPConnection("127.0.0.1", _port(flaky_s3.url), timeout=30)

    def call(method, path, body=None, headers=None, **kwargs):
        conn.request(method, f"/{s3_bucket}/{path}", body=body, headers={**_AUTH, **(headers or {})}, **kwargs)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()

    before = flaky_s3.requests
    # one kept-alive connection throughout
    status, _, _ = call("PUT", "obj", body=iter([b"hello ", b"chunked ", b"world"]), encode_chunked=True)
    assert status == 200
    assert call("GET", "obj")[::2] == (200, b"hello chunked world")
    status, headers, body = call("HEAD", "obj")
    assert (status, headers["Content-Length"], body) == (200, "19", b"")
    status, _, body = call("PUT", "obj", body=b"other", headers={"If-None-Match": "*"})
    assert status == 412 and b"PreconditionFailed" in body
    assert call("GET", "obj")[2] == b"hello chunked world"
    conn.close()
    assert flaky_s3.requests - before == 5 and not flaky_s3.counts


def test_proxy_faults_are_seeded(flaky_s3, s3_bucket):
    def run(seed: int) -> list[str]:
        flaky_s3.reset_counts()
        flaky_s3.set_faults(0.5, ("slowdown", "internal"), seed)
        conn = http.client.HTTPConnection("127.0.0.1", _port(flaky_s3.url), timeout=30)
        statuses = []
        for _ in range(30):
            conn.request("HEAD", f"/{s3_bucket}", headers=_AUTH)
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
        conn.close()
        assert flaky_s3.counts["slowdown"] + flaky_s3.counts["internal"] == statuses.count(503) + statuses.count(500)
        return statuses

    first = run(7)
    assert run(7) == first and 5 < first.count(200) < 25 and {500, 503} <= set(first)
    assert run(8) != first


@pytest.mark.parametrize("kind", KINDS)
def test_every_storage_operation_survives_each_fault(flaky_s3, s3_bucket, tmp_path, kind):
    store = S3Storage(f"s3://{s3_bucket}/ops")
    store.put_bytes("x", b"hello")
    local = tmp_path / "file.bin"
    local.write_bytes(os.urandom(3000))
    operations = {
        "put_bytes": lambda: store.put_bytes("k", b"v" * 100),
        "get_bytes": lambda: store.get_bytes("x") == b"hello",
        "exists": lambda: store.exists("x") and not store.exists("missing"),
        "list": lambda: "k" in {i.key for i in store.list()},
        "put_file": lambda: store.put_file("f", local) or store.get_bytes("f") == local.read_bytes(),
        "commit": lambda: Ledger(store).commit(_marker(f"shard-{kind}")),
        "delete": lambda: store.delete(["f"]) or not store.exists("f"),
        "arrow_read": lambda: _arrow_read(store, "x") == b"hello",
        "open_read": lambda: _ranged_read(store, "x", 1, 3) == b"ell",
    }
    for name, operation in operations.items():
        before = flaky_s3.counts[kind]
        flaky_s3.force(kind)
        assert operation() in (True, None), f"{name} after a {kind} fault"
        assert flaky_s3.counts[kind] == before + 1, f"{name}: the fault was not injected"


def _marker(shard: str, attempt: int = 1) -> CommitMarker:
    return CommitMarker(shard=shard, file="m.parquet", start=0, end=1, rows=1, ok=1, error=0, digest="d",
                        fingerprint="f", format="files", attempt=attempt)


def _arrow_read(store: S3Storage, key: str) -> bytes:
    fs, root = store.arrow_fs()
    with fs.open_input_file(f"{root}/{key}") as f:
        return f.read()


def _ranged_read(store: S3Storage, key: str, offset: int, n: int) -> bytes:
    with store.open_read(key) as f:
        f.seek(offset)
        return f.read(n)


def test_commit_whose_answer_was_lost_is_still_ours(flaky_s3, s3_bucket):
    """The conditional PUT lands, its answer is lost, botocore retries and gets 412."""
    store = S3Storage(f"s3://{s3_bucket}/out")
    flaky_s3.force("lost", method="PUT", path_contains="_commits/")
    assert not store.put_if_absent("_commits/raw.json", b"{}"), "put_if_absent alone cannot tell"
    assert flaky_s3.counts["lost"] == 1

    ledger = Ledger(store)
    flaky_s3.force("lost", method="PUT", path_contains="_commits/")
    assert ledger.commit(_marker("s1", attempt=1)) is True
    assert flaky_s3.counts["lost"] == 2
    assert ledger.commit(_marker("s1", attempt=2)) is False, "a second attempt must lose"
    assert json.loads(store.get_bytes(commit_key("s1")))["attempt"] == 1


def test_multipart_upload_through_faults(flaky_s3, s3_bucket, tmp_path):
    store = S3Storage(f"s3://{s3_bucket}/mp", multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    data = os.urandom(12 * 2**20)  # three parts
    (tmp_path / "big").write_bytes(data)

    def stored() -> bytes:
        with endpoint_env(flaky_s3.upstream):
            return open_storage(f"s3://{s3_bucket}/mp").get_bytes("big.tar")

    flaky_s3.set_faults(0.3, seed=3)  # botocore retries each part
    store.put_file("big.tar", tmp_path / "big")
    assert sum(flaky_s3.stats()[1].values()) >= 2
    assert hashlib.sha256(stored()).digest() == hashlib.sha256(data).digest()

    # completed, but the answer is lost: botocore completes it again, and the new bytes are stored
    flaky_s3.set_faults(0.0)
    data = data[::-1]
    (tmp_path / "big").write_bytes(data)
    flaky_s3.force("lost", method="POST", path_contains="uploadId=")
    store.put_file("big.tar", tmp_path / "big")
    assert flaky_s3.stats()[1]["lost"] >= 1 and stored() == data


# ------------------------------------------------------------------ a whole run through faults
ROWS = 100
SHARDS = ROWS // 25


def _manifest_table(n: int) -> pa.Table:
    return pa.table({
        "id": [f"row-{i:04d}" for i in range(n)],
        "prompt": [f"a lighthouse in a storm #{i}" for i in range(n)],
        "seed": pa.array([i * 11 for i in range(n)], pa.int64()),
        "topic": [f"t{i % 3}" for i in range(n)],
    })


# One image per object (the most requests, so the most faults); a container format (tars)
# goes through faults in test_num_images.py.
@pytest.mark.parametrize("fmt", ["files"])
def test_run_through_flaky_storage_is_exactly_once(flaky_s3, s3_bucket, tmp_path, ray_tmpdir, fmt):
    local = tmp_path / "manifest.parquet"
    table = _manifest_table(ROWS)
    pq.write_table(table, local, row_group_size=40)
    manifest = f"s3://{s3_bucket}/manifests/prompts.parquet"
    open_storage(f"s3://{s3_bucket}/manifests").put_file("prompts.parquet", local)
    output = f"s3://{s3_bucket}/out-{fmt}"

    flaky_s3.set_faults(0.15, KINDS, seed=11)  # manifest reads, uploads and commits all go through faults
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "zimage_batch.cli", "run", "--manifest", manifest, "--output", output,
         "--model", "tiny:turbo", "--format", fmt, "--workers", "2", "--shard-size", "25", "--batch-size", "8"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_TMPDIR": ray_tmpdir},
    )
    elapsed = time.time() - started
    requests, counts = flaky_s3.stats()
    flaky_s3.set_faults(0.0)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert f"done: {ROWS} ok, 0 error of {ROWS} rows; {SHARDS} shards committed" in result.stdout

    assert requests > 100 and sum(counts.values()) >= 0.1 * requests, (requests, counts)
    assert all(counts.get(kind, 0) > 0 for kind in KINDS), counts
    print(f"{fmt}: {requests} requests, faults {counts}, {elapsed:.1f}s")

    with endpoint_env(flaky_s3.upstream):  # read back directly, not through the proxy
        rows = check_exactly_once(output, table.column("id").to_pylist())
        markers = Ledger(open_storage(output)).committed()
    assert all(r["status"] == "ok" for r in rows) and {r["topic"] for r in rows} == {"t0", "t1", "t2"}
    assert len(markers) == SHARDS and all(m.ok == 25 for m in markers.values())
    # The report read every image back through the faults (for webdataset: members of the tars).
    assert "could not write the report" not in result.stdout + result.stderr
    with endpoint_env(flaky_s3.upstream):
        page = open_storage(output).get_bytes("report.html").decode()
    assert page.count('src="data:image/jpeg;base64,') == ROWS
