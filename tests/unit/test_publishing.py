"""Publishing a committed shard: a local images folder appears whole, a publish cut short is
finished, deletes that fail are swept, and `_staging/` ends empty."""

from __future__ import annotations

import pytest

from zimage_batch.output import layout
from zimage_batch.output.ledger import CommitMarker, Ledger
from zimage_batch.output.writers import make_writer
from zimage_batch.storage import StorageError, open_storage

IMAGES = 12


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    return open_storage(f"s3://{request.getfixturevalue('s3_bucket')}/out")


def _marker(shard: str, fmt: str = "files") -> CommitMarker:
    return CommitMarker(shard=shard, file="m.parquet", start=0, end=IMAGES, rows=IMAGES, ok=IMAGES, error=0,
                        digest="d", fingerprint="f", format=fmt)


def _stage(store, marker: CommitMarker) -> None:
    """The attempt's files, as a worker stages them: the writer's, then the metadata."""
    staged = store.child(marker.staging.prefix)
    with make_writer(marker.format, staged, marker.shard, upload_threads=4) as writer:
        for i in range(IMAGES):
            writer.add(f"k{i:03d}", b"png-%d" % i, {"id": str(i), "prompt": "p"})
    staged.put_bytes(layout.metadata_key(marker.shard), b"metadata")


def _committed(store, shard: str = "s1", fmt: str = "files") -> CommitMarker:
    marker = _marker(shard, fmt)
    _stage(store, marker)
    assert Ledger(store).commit(marker)
    return marker


def _images(store, shard: str) -> int:
    return len(list(store.list(layout.images_prefix(shard))))


def _staged(store) -> list[str]:
    return [info.key for info in store.list(layout.STAGING)]


def test_a_local_images_folder_appears_whole_at_every_step_of_its_publish(tmp_path, monkeypatch):
    """Between any two storage steps of a publish (where a SIGKILL can land), `images/<shard>/`
    holds no image or every image, and the metadata comes after the whole folder."""
    store = open_storage(str(tmp_path / "out"))
    marker = _committed(store)
    seen = []

    def look() -> None:
        folder = tmp_path / "out" / "images" / "s1"
        seen.append((len(list(folder.iterdir())) if folder.is_dir() else 0,
                     (tmp_path / "out" / "metadata" / "s1.parquet").exists()))

    for name in ("move", "publish_folder", "delete", "delete_prefix", "list", "exists"):
        real = getattr(store, name)

        def spy(*args, _real=real, **kwargs):
            look()
            result = _real(*args, **kwargs)
            look()
            return result

        monkeypatch.setattr(store, name, spy)
    Ledger(store).publish(marker)
    monkeypatch.undo()
    assert seen and {images for images, _ in seen} == {0, IMAGES}, seen
    assert all(images == IMAGES for images, metadata in seen if metadata)
    assert _staged(store) == [] and Ledger(store).is_published("s1")


@pytest.mark.parametrize("cut", ["before the folder", "after the folder"])
def test_a_folder_publish_cut_short_is_finished_by_the_sweep(store, monkeypatch, cut):
    marker = _committed(store)
    if cut == "before the folder":
        def dies(*args, **kwargs):
            raise ConnectionError("worker killed (injected)")

        monkeypatch.setattr(store, "publish_folder", dies)
    else:
        monkeypatch.setattr(store, "move", lambda src, dst: (_ for _ in ()).throw(ConnectionError("killed")))
    with pytest.raises(ConnectionError):
        Ledger(store).publish(marker)
    monkeypatch.undo()
    ledger = Ledger(store)
    assert _images(store, "s1") == (0 if cut == "before the folder" else IMAGES)
    assert not ledger.is_published("s1") and not store.exists("metadata/s1.parquet")
    assert ledger.sweep_staging() == ["s1"]  # reads the marker itself
    assert _images(store, "s1") == IMAGES and store.get_bytes("metadata/s1.parquet") == b"metadata"
    assert _staged(store) == [] and ledger.is_published("s1")
    store.publish_folder(marker.staging.prefix + layout.images_prefix("s1"), layout.images_prefix("s1"))  # again: fine
    assert _images(store, "s1") == IMAGES


def test_the_sweep_removes_every_dead_attempt_and_keeps_the_committed_files(store):
    """A committed shard's losers and the attempts of shards never committed are removed; the
    committed shard, already published, is untouched."""
    ledger = Ledger(store)
    winner = _committed(store, "s1", "webdataset")
    ledger.publish(winner)
    _stage(store, _marker("s1", "webdataset"))  # a loser of s1, left by a killed worker
    _stage(store, _marker("s2"))  # an attempt that never committed
    assert {key.split("/")[1] for key in _staged(store)} == {"s1", "s2"}
    lines = []
    assert ledger.sweep_staging(ledger.committed(), lines.append) == []
    assert _staged(store) == [] and lines == ["removed the staged files of 1 shard(s) whose attempts never committed"]
    assert store.exists("shards/s1.tar") and _images(store, "s2") == 0 and not store.exists("metadata/s2.parquet")


def test_failed_deletes_are_retried_then_named_in_one_line(tmp_path, monkeypatch):
    store = open_storage(str(tmp_path / "out"))
    _stage(store, _marker("s3"))
    real, failures = store.delete_prefix, []

    def fails_twice(prefix):
        if len(failures) < 2:
            failures.append(prefix)
            raise OSError("device busy (injected)")
        real(prefix)

    monkeypatch.setattr(store, "delete_prefix", fails_twice)
    monkeypatch.setattr(Ledger, "STAGING_RETRY_S", 10.0)
    Ledger(store).sweep_staging({})
    assert len(failures) == 2 and _staged(store) == []

    _stage(store, _marker("s4"))
    monkeypatch.setattr(store, "delete_prefix", lambda prefix: (_ for _ in ()).throw(OSError("still busy")))
    monkeypatch.setattr(Ledger, "STAGING_RETRY_S", 1.0)
    with pytest.raises(StorageError, match=r"could not remove .*_staging/s4/? after 1s \(still busy\); the committed rows"):
        Ledger(store).sweep_staging({})


def test_deletes_that_fail_on_s3_leave_the_shard_unpublished_until_a_sweep(s3_bucket, flaky_s3, monkeypatch):
    """DeleteObjects answering 500: the publish gets the files out but leaves `_staging/` (it
    counts as not published); a sweep while the store still fails says so; once it recovers,
    the sweep leaves `_staging/` empty."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # no botocore retries: the test is about ours
    store = open_storage(f"s3://{s3_bucket}/out")
    marker = _committed(store)
    flaky_s3.force("internal", "POST", "delete", times=1000)
    ledger = Ledger(store)
    ledger.publish(marker)  # logs the failed deletes, does not raise: the shard's files are out
    assert _images(store, "s1") == IMAGES and store.exists("metadata/s1.parquet")
    assert _staged(store) and not ledger.is_published("s1")
    monkeypatch.setattr(Ledger, "STAGING_RETRY_S", 1.0)
    with pytest.raises(StorageError, match="InternalError|500"):
        ledger.sweep_staging()
    flaky_s3.clear_forced()
    assert ledger.sweep_staging() == []  # the metadata was out: only leftovers to remove
    assert _staged(store) == [] and ledger.is_published("s1") and _images(store, "s1") == IMAGES


def test_an_s3_folder_publish_costs_one_copy_per_image_and_one_delete_request(s3_bucket, flaky_s3):
    """PUT to staging, then per image one CopyObject; the deletes go in DeleteObjects batches."""
    store = open_storage(f"s3://{s3_bucket}/out")
    marker = _committed(store)
    before, _ = flaky_s3.stats()
    Ledger(store).publish(marker)
    requests, _ = flaky_s3.stats()
    # IMAGES copies + the metadata's copy; a few lists, deletes and checks, whatever IMAGES is
    assert IMAGES + 1 <= requests - before <= IMAGES + 8, requests - before
