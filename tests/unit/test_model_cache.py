"""The S3 model cache against the real (moto) S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from zimage_batch.model import cache as model_cache
from zimage_batch.model.cache import CACHE_MANIFEST, fetch_s3_folder
from zimage_batch.storage import S3Storage, open_storage, s3_client

FILES = {
    "model_index.json": b'{"_class_name": "ZImagePipeline"}',
    "transformer/config.json": b'{"dim": 8}',
    "transformer/diffusion_pytorch_model.safetensors": os.urandom(300_000),
    "vae/diffusion_pytorch_model.safetensors": os.urandom(50_000),
    "tokenizer/tokenizer.json": "{\"中\": 1}".encode(),
}


@pytest.fixture
def checkpoint(s3_bucket):
    uri = f"s3://{s3_bucket}/models/tiny/"
    store = open_storage(uri)
    for key, data in FILES.items():
        store.put_bytes(key, data)
    return uri


@pytest.fixture
def s3_calls():
    """Counts S3 API calls by operation name, via a botocore event hook on the shared client."""
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def count(model, **_):
        with lock:
            counts[model.name] = counts.get(model.name, 0) + 1

    events = s3_client().meta.events
    events.register("before-call.s3", count)
    yield counts
    events.unregister("before-call.s3", count)


def assert_copy_of(path, files=FILES):
    for key, data in files.items():
        assert (path / key).read_bytes() == data
    manifest = json.loads((path / CACHE_MANIFEST).read_text())
    assert set(manifest["files"]) == set(files)
    assert all(v["size"] == len(files[k]) for k, v in manifest["files"].items())


def test_first_call_downloads_second_reuses(checkpoint, tmp_path, s3_calls):
    cache = tmp_path / "cache"
    path = fetch_s3_folder(checkpoint, cache)
    assert path.parent == cache
    assert_copy_of(path)
    assert s3_calls.get("GetObject", 0) == len(FILES)
    inode = path.stat().st_ino

    s3_calls.clear()
    again = fetch_s3_folder(checkpoint, cache)
    assert again == path and again.stat().st_ino == inode
    assert s3_calls == {"ListObjectsV2": 1}  # the listing only: no GetObject, no HeadObject
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [path.name]


def test_interrupted_download_is_never_used(checkpoint, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    original = S3Storage.download
    done = []

    def flaky(self, key, local_path):
        if len(done) == 2:
            raise ConnectionError("network dropped")
        original(self, key, local_path)
        done.append(key)

    monkeypatch.setattr(S3Storage, "download", flaky)
    with pytest.raises(ConnectionError):
        fetch_s3_folder(checkpoint, cache)
    # Nothing usable (or half-copied) is left behind.
    assert [p for p in cache.iterdir() if not p.name.endswith(".lock")] == []

    monkeypatch.setattr(S3Storage, "download", original)
    assert_copy_of(fetch_s3_folder(checkpoint, cache))


def test_crash_leftover_temp_folder_is_removed(checkpoint, tmp_path):
    """A process killed mid-download leaves its temp folder; the next call cleans it up."""
    cache = tmp_path / "cache"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = cache / f".tmp-{dead.pid}-{model_cache._HOST}-deadbeef-whatever"
    (leftover / "transformer").mkdir(parents=True)
    (leftover / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")

    path = fetch_s3_folder(checkpoint, cache)
    assert_copy_of(path)
    assert not leftover.exists()


def test_damaged_entry_is_downloaded_again(checkpoint, tmp_path):
    cache = tmp_path / "cache"
    path = fetch_s3_folder(checkpoint, cache)
    (path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"truncated")
    again = fetch_s3_folder(checkpoint, cache)
    assert again == path
    assert_copy_of(again)


def test_changed_object_gets_new_entry(checkpoint, tmp_path):
    cache = tmp_path / "cache"
    first = fetch_s3_folder(checkpoint, cache)
    open_storage(checkpoint).put_bytes("transformer/config.json", b'{"dim": 16}')
    second = fetch_s3_folder(checkpoint, cache)
    assert second != first
    assert (second / "transformer" / "config.json").read_bytes() == b'{"dim": 16}'
    assert (first / "transformer" / "config.json").read_bytes() == b'{"dim": 8}'


@pytest.mark.parametrize("name", ["pytorch_model.bin", "unet/model.ckpt", "weights.pt", "x.PTH",
                                  "state.pkl"])
def test_pickle_weights_refused(checkpoint, tmp_path, name):
    open_storage(checkpoint).put_bytes(name, b"\x80\x04pickle")
    with pytest.raises(ValueError, match="pickle"):
        fetch_s3_folder(checkpoint, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_empty_prefix_refused(s3_bucket, tmp_path):
    with pytest.raises(ValueError, match="no objects"):
        fetch_s3_folder(f"s3://{s3_bucket}/nothing/", tmp_path / "cache")


def test_corrupt_download_detected_by_etag(checkpoint, tmp_path, monkeypatch):
    original = S3Storage.download

    def corrupting(self, key, local_path):
        original(self, key, local_path)
        if key.endswith("config.json"):
            with open(local_path, "r+b") as f:
                f.write(b"X")  # same size, different bytes

    monkeypatch.setattr(S3Storage, "download", corrupting)
    with pytest.raises(OSError, match="ETag"):
        fetch_s3_folder(checkpoint, tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_multipart_etag_checked_by_size(s3_bucket, tmp_path):
    mib = 1024 * 1024
    store = S3Storage(f"s3://{s3_bucket}/mp", multipart_threshold=5 * mib, multipart_chunksize=5 * mib)
    src = tmp_path / "w.safetensors"
    src.write_bytes(os.urandom(6 * mib))
    store.put_file("w.safetensors", src)
    assert "-" in next(iter(store.list())).etag
    path = fetch_s3_folder(store.uri, tmp_path / "cache")
    assert (path / "w.safetensors").read_bytes() == src.read_bytes()


def test_concurrent_callers_share_one_download(checkpoint, tmp_path, s3_calls):
    cache = tmp_path / "cache"
    results, errors = [], []

    def call():
        try:
            results.append(fetch_s3_folder(checkpoint, cache))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert_copy_of(results[0])
    assert s3_calls.get("GetObject", 0) == len(FILES)  # the lock made the others wait and reuse


def test_concurrent_processes(checkpoint, tmp_path):
    """Two processes (inheriting the S3 settings from os.environ) fetch at the same time."""
    cache = tmp_path / "cache"
    code = ("import sys; from zimage_batch.model.cache import fetch_s3_folder; "
            "print(fetch_s3_folder(sys.argv[1], sys.argv[2]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, checkpoint, str(cache)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    assert_copy_of(type(tmp_path)(paths.pop()))
