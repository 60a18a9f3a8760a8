"""The same storage behaviours against a local folder and a real (moto) S3 server."""

from __future__ import annotations

import os
import threading

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from zimage_batch.storage import (
    LocalStorage,
    ObjectInfo,
    S3Storage,
    StorageError,
    is_s3,
    open_storage,
    s3_client,
    split_s3_uri,
)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/some/prefix/")


def test_open_storage_and_uris(tmp_path):
    assert is_s3("s3://b/p") and not is_s3(str(tmp_path))
    assert split_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert split_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError):
        split_s3_uri("s3:///x")
    s3 = open_storage("s3://bucket/a/b/")
    assert isinstance(s3, S3Storage) and s3.uri == "s3://bucket/a/b"
    assert s3.url("x/y.png") == "s3://bucket/a/b/x/y.png"
    assert open_storage("s3://bucket").url("k") == "s3://bucket/k"
    local = open_storage(f"file://{tmp_path}/out/")
    assert isinstance(local, LocalStorage) and local.uri == str(tmp_path / "out")
    assert local.url("a/b") == str(tmp_path / "out" / "a" / "b")


def test_put_get_exists(store):
    assert not store.exists("a/b.txt")
    with pytest.raises(FileNotFoundError):
        store.get_bytes("a/b.txt")
    store.put_bytes("a/b.txt", b"hello")
    assert store.exists("a/b.txt")
    assert store.get_bytes("a/b.txt") == b"hello"
    store.put_bytes("a/b.txt", b"replaced")
    assert store.get_bytes("a/b.txt") == b"replaced"
    store.put_bytes("unicode/中文 id.txt", "图".encode())
    assert store.get_bytes("unicode/中文 id.txt") == "图".encode()


def test_open_read_seeks_and_reads_ranges(store, monkeypatch):
    data = os.urandom(700_000)
    store.put_bytes("big.bin", data)
    if isinstance(store, S3Storage):  # small blocks, so reads cross block edges
        monkeypatch.setattr("zimage_batch.storage.s3.READ_BLOCK", 4096)
    with store.open_read("big.bin") as f:
        assert f.read(10) == data[:10]
        f.seek(300_000)
        assert f.read(5000) == data[300_000:305_000]
        f.seek(-7, os.SEEK_END)
        assert f.read() == data[-7:] and f.read(3) == b""
        f.seek(123)
        assert f.tell() == 123 and f.read() == data[123:]
    with pytest.raises(FileNotFoundError):
        store.open_read("missing.bin")


def test_list_delete_and_delete_prefix(store):
    keys = ["b/2.txt", "a/1.txt", "a/sub/3.txt", "ab.txt", "c.txt"]
    for i, key in enumerate(keys):
        store.put_bytes(key, b"x" * i)
    listed = list(store.list())
    assert [o.key for o in listed] == sorted(keys)
    assert {o.key: o.size for o in listed} == {k: i for i, k in enumerate(keys)}
    assert all(isinstance(o, ObjectInfo) for o in listed)
    assert [o.key for o in store.list("a/")] == ["a/1.txt", "a/sub/3.txt"]
    assert [o.key for o in store.list("a")] == ["a/1.txt", "a/sub/3.txt", "ab.txt"]
    assert list(store.list("missing/")) == []

    store.delete(["c.txt", "does/not/exist"])
    assert not store.exists("c.txt")
    store.delete_prefix("a/")
    assert [o.key for o in store.list()] == ["ab.txt", "b/2.txt"]
    store.delete_prefix("")
    assert list(store.list()) == []


def test_delete_many_keys_in_batches(store, monkeypatch):
    import zimage_batch.storage.s3 as s3_storage

    monkeypatch.setattr(s3_storage, "DELETE_BATCH", 3)
    keys = [f"k/{i:02d}" for i in range(8)]
    for key in keys:
        store.put_bytes(key, b"1")
    store.delete(keys[:7])
    assert [o.key for o in store.list()] == ["k/07"]


def test_put_if_absent(store):
    assert store.put_if_absent("_commits/s0.json", b"first") is True
    assert store.put_if_absent("_commits/s0.json", b"second") is False
    assert store.get_bytes("_commits/s0.json") == b"first"


def test_put_if_absent_race_has_one_winner(store):
    n_threads, rounds = 8, 3
    for r in range(rounds):
        key = f"race/{r}"
        barrier = threading.Barrier(n_threads)
        results: dict[int, bool] = {}

        def attempt(i: int) -> None:
            barrier.wait()
            results[i] = store.put_if_absent(key, f"writer-{i}".encode())

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, won in results.items() if won]
        assert len(results) == n_threads and len(winners) == 1
        assert store.get_bytes(key) == f"writer-{winners[0]}".encode()
    if isinstance(store, LocalStorage):  # no temporary files left behind
        assert sorted(os.listdir(store.root / "race")) == [str(r) for r in range(rounds)]


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a\x00b", "", "..", "a/.."])
def test_bad_keys_rejected(tmp_path, key):
    store = LocalStorage(tmp_path / "root")
    for op in (lambda: store.put_bytes(key, b"x"), lambda: store.get_bytes(key),
               lambda: store.put_if_absent(key, b"x"), lambda: store.exists(key),
               lambda: store.url(key)):
        with pytest.raises(ValueError):
            op()
    assert not (tmp_path / "x").exists()


def test_put_file_local(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1000))
    store = LocalStorage(tmp_path / "root")
    store.put_file("d/f.bin", src)
    assert store.get_bytes("d/f.bin") == src.read_bytes()
    store.download("d/f.bin", tmp_path / "copy" / "f.bin")
    assert (tmp_path / "copy" / "f.bin").read_bytes() == src.read_bytes()


def test_put_file_multipart_s3(s3_bucket, tmp_path):
    mib = 1024 * 1024
    store = S3Storage(f"s3://{s3_bucket}/big", multipart_threshold=5 * mib,
                      multipart_chunksize=5 * mib)
    src = tmp_path / "big.bin"
    data = os.urandom(11 * mib)
    src.write_bytes(data)
    store.put_file("weights/big.bin", src)
    (info,) = store.list("weights/")
    assert info.size == len(data)
    assert info.etag and info.etag.endswith("-3")  # three parts: 5 + 5 + 1 MiB
    assert store.get_bytes("weights/big.bin") == data
    store.download("weights/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data
    with pytest.raises(FileNotFoundError):
        store.download("weights/missing.bin", tmp_path / "missing.bin")


def test_arrow_fs_parquet_round_trip(store):
    table = pa.table({"id": ["a", "b", "中"], "seed": pa.array([1, 2, 3], pa.int64())})
    fs, root = store.arrow_fs()
    fs.create_dir(f"{root}/metadata", recursive=True)
    pq.write_table(table, f"{root}/metadata/s0.parquet", filesystem=fs)
    assert [o.key for o in store.list("metadata/")] == ["metadata/s0.parquet"]
    assert pq.read_table(f"{root}/metadata/s0.parquet", filesystem=fs).equals(table)
    dataset = ds.dataset(f"{root}/metadata", filesystem=fs, format="parquet")
    assert dataset.to_table().equals(table)
    # Bytes written through the Storage interface are readable through arrow, and back.
    store.put_bytes("metadata/s1.parquet", store.get_bytes("metadata/s0.parquet"))
    assert pq.read_table(f"{root}/metadata/s1.parquet", filesystem=fs).equals(table)


def test_check_writable_ok(store):
    store.check_writable()
    assert list(store.list()) == []


def test_check_writable_missing_bucket(s3_server):
    store = open_storage("s3://no-such-bucket-zimage/out")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-zimage' does not exist"):
        store.check_writable()
    with pytest.raises(StorageError, match="does not exist"):
        store.put_bytes("x", b"1")


def test_check_writable_local_unwritable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="cannot write to local folder"):
        LocalStorage(blocker / "out").check_writable()


def test_errors_do_not_leak_credentials(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SUPERSECRETVALUE123")
    with pytest.raises(StorageError) as err:
        open_storage("s3://no-such-bucket-zimage/out").check_writable()
    assert "SUPERSECRETVALUE123" not in str(err.value)
    assert "testing" not in str(err.value)


def test_s3_client_is_shared(s3_server):
    assert s3_client() is s3_client()
    config = s3_client().meta.config
    assert config.retries["mode"] in ("adaptive", "standard")
    assert config.retries["total_max_attempts"] == 11  # max_attempts=10 retries + the first try
    assert s3_client().meta.endpoint_url == s3_server


def test_s3_retries_follow_the_aws_settings(s3_server, monkeypatch, tmp_path):
    """AWS_MAX_ATTEMPTS / AWS_RETRY_MODE (or the profile's max_attempts / retry_mode) win over
    the default, as in every AWS tool; a bad value is one clear error."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    retries = s3_client().meta.config.retries
    assert retries["total_max_attempts"] == 2 and retries["mode"] == "standard"
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    monkeypatch.delenv("AWS_RETRY_MODE")
    config = tmp_path / "config"
    config.write_text("[default]\nmax_attempts = 3\nretry_mode = legacy\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    retries = s3_client().meta.config.retries
    assert retries["total_max_attempts"] == 3 and retries["mode"] == "legacy"
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "many")
    with pytest.raises(StorageError, match="AWS_MAX_ATTEMPTS .* must be a whole number"):
        s3_client()


def _record(fingerprint: str) -> dict:
    return {"fingerprint": fingerprint, "job": {"model": fingerprint}, "output_fields": ["model"]}


def test_claim_output_loses_a_race_to_another_job(store, monkeypatch):
    """Two jobs start on an empty OUTPUT at once: both see no job.json, one creates it, and the
    other is refused (not silently sharing the OUTPUT)."""
    from zimage_batch.output.ledger import JobMismatch, Ledger

    winner, loser = Ledger(store), Ledger(store)
    looks = []

    def looked_before_the_winner_wrote():
        looks.append(1)
        return None if len(looks) == 1 else Ledger.read_job(loser)

    monkeypatch.setattr(loser, "read_job", looked_before_the_winner_wrote)
    winner.claim_output(_record("job-a"), overwrite=False)
    with pytest.raises(JobMismatch, match="different job"):
        loser.claim_output(_record("job-b"), overwrite=False)
    assert winner.read_job()["fingerprint"] == "job-a"
    Ledger(store).claim_output(_record("job-a"), overwrite=False)  # the same job resumes


def test_overwrite_removes_job_json_last(store):
    """A clear cut short must leave job.json, so a plain rerun of another job is still refused."""
    from zimage_batch.output.ledger import Ledger, output_prefixes

    ledger = Ledger(store)
    ledger.claim_output(_record("job-a"), overwrite=False)
    for key in ("_commits/s.json", "metadata/s.parquet", "images/s/k.png", "report.html"):
        store.put_bytes(key, b"x")
    deleted = []
    real_delete_prefix = store.delete_prefix
    store.delete_prefix = lambda prefix: (deleted.append(prefix), real_delete_prefix(prefix))
    ledger.claim_output(_record("job-b"), overwrite=True)
    assert deleted == list(output_prefixes()) and deleted[0] == "_commits/" and deleted[-1] == "job.json"
    assert deleted[2:5] == ["images/", "shards/", "data/"]  # every format's folder
    assert {i.key for i in store.list()} == {"job.json"} and ledger.read_job()["fingerprint"] == "job-b"


def test_move_and_child(store):
    store.put_bytes("_staging/s/t/shards/s.tar", b"tar bytes")
    staged = store.child("_staging/s/t")
    assert staged.get_bytes("shards/s.tar") == b"tar bytes"
    staged.put_bytes("metadata/s.parquet", b"meta")
    assert store.get_bytes("_staging/s/t/metadata/s.parquet") == b"meta"
    store.move("_staging/s/t/shards/s.tar", "shards/s.tar")
    assert store.get_bytes("shards/s.tar") == b"tar bytes" and not store.exists("_staging/s/t/shards/s.tar")
    store.move("_staging/s/t/shards/s.tar", "shards/s.tar")  # already moved: fine
    with pytest.raises(FileNotFoundError):
        store.move("_staging/nothing", "nowhere")


def _marker(shard: str, **fields):
    from zimage_batch.output.ledger import CommitMarker

    return CommitMarker(shard=shard, file="m.parquet", start=0, end=2, rows=2, ok=2, error=0, digest="d",
                        fingerprint="f", format="webdataset", **fields)


def _stage(store, marker, tar: bytes = b"tar") -> None:
    staged = store.child(marker.staging.prefix)
    staged.put_bytes(f"shards/{marker.shard}.tar", tar)
    staged.put_bytes(f"metadata/{marker.shard}.parquet", b"meta-" + tar)


def test_a_shard_is_visible_only_once_committed_and_published(store):
    """Staged files are not under metadata/ or shards/ until the commit, then the winner's
    files are published and every staging folder of the shard is gone; a loser cannot commit."""
    from zimage_batch.output.ledger import Ledger

    ledger = Ledger(store)
    winner, loser = _marker("s1"), _marker("s1")
    _stage(store, winner, b"winner")
    _stage(store, loser, b"loser")
    assert not list(store.list("shards/")) and not list(store.list("metadata/"))
    assert ledger.commit(winner) and not ledger.commit(loser)
    assert ledger.published_shards() == set()
    ledger.publish(winner)
    assert store.get_bytes("shards/s1.tar") == b"winner"
    assert store.get_bytes("metadata/s1.parquet") == b"meta-winner"
    assert list(store.list("_staging/")) == [] and ledger.published_shards() == {"s1"}
    assert ledger.marker("s1") == winner


def test_a_publish_cut_short_is_finished_by_the_next_run(store, monkeypatch):
    from zimage_batch.output.ledger import Ledger

    ledger = Ledger(store)
    marker = _marker("s2")
    _stage(store, marker)
    assert ledger.commit(marker)
    real_move, moves = store.move, []

    def dies_after_the_tar(src, dst):
        if moves:
            raise ConnectionError("worker died (injected)")
        moves.append(dst)
        real_move(src, dst)

    monkeypatch.setattr(store, "move", dies_after_the_tar)
    with pytest.raises(ConnectionError):
        ledger.publish(marker)
    monkeypatch.undo()
    assert store.exists("shards/s2.tar") and not store.exists("metadata/s2.parquet")
    assert ledger.published_shards() == set() and not ledger.is_published("s2")  # metadata goes last
    assert Ledger(store).sweep_staging(Ledger(store).committed()) == ["s2"]
    assert store.exists("metadata/s2.parquet") and list(store.list("_staging/")) == []
    assert ledger.is_published("s2")


def test_deleting_a_local_prefix_removes_temporary_files_of_writes_cut_short(tmp_path):
    """A process killed mid-write leaves its hidden temporary file; a sweep of the folder takes it too."""
    from zimage_batch.storage.local import TMP_MARK

    storage = open_storage(str(tmp_path))
    storage.put_bytes("_staging/s/t/metadata/s.parquet", b"x")
    (tmp_path / "_staging/s/t/metadata" / f"{TMP_MARK}s.parquet.123").write_bytes(b"half")
    storage.delete_prefix("_staging/s/")
    assert not (tmp_path / "_staging" / "s").exists()
