"""The ledger (output/ledger.py) on a local folder and on S3 (the moto server): a commit marker
round-trips, a shard commits once, publishing is idempotent, `is_published` means metadata out
and nothing staged, the sweep leaves `_staging/` empty, and shards that can never be published
are forgotten whole."""

from __future__ import annotations

import dataclasses
import json

import pytest

from zimage_batch.output import layout
from zimage_batch.output.formats import get_format
from zimage_batch.output.ledger import CommitMarker, JobMismatch, Ledger
from zimage_batch.storage import open_storage


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    return open_storage(f"s3://{request.getfixturevalue('s3_bucket')}/out/")


def _marker(shard: str, fmt: str = "webdataset", **more) -> CommitMarker:
    return CommitMarker(shard=shard, file="m.parquet", start=0, end=4, rows=4, ok=4, error=0, digest="d",
                        fingerprint="f", format=fmt, **more)


def _final_keys(marker: CommitMarker) -> list[str]:
    """What an attempt of `marker` stages (under its final names): images or a shard file, then metadata."""
    if marker.format == "files":
        data = [layout.image_key(marker.shard, f"k{i}", "png") for i in range(3)]
    else:
        data = [get_format(marker.format).shard_key(marker.shard)]
    return [*data, layout.metadata_key(marker.shard)]


def _stage(store, marker: CommitMarker) -> None:
    for key in _final_keys(marker):
        store.put_bytes(marker.staging.prefix + key, f"{marker.token} {key}".encode())


def _keys(store, prefix: str = "") -> set[str]:
    return {info.key for info in store.list(prefix)}


def test_a_marker_round_trips_and_ignores_keys_of_newer_versions():
    marker = _marker("s1", errors=("row 3: no source",), variant="base", run="lease-token", images=8, filtered=1)
    assert CommitMarker.from_json(marker.to_json()) == marker
    newer = marker.to_json().replace(b'{"attempt"', b'{"added_later": [1, 2], "attempt"')
    assert b"added_later" in newer and CommitMarker.from_json(newer) == marker
    older = {k: v for k, v in dataclasses.asdict(marker).items() if k not in ("run", "filtered", "images")}
    assert CommitMarker.from_json(json.dumps(older)) == dataclasses.replace(marker, run="", filtered=0, images=0)


def test_a_shard_commits_once_and_a_lost_answer_is_still_ours(store):
    ledger = Ledger(store)
    first, second = _marker("s1"), _marker("s1")
    assert first.token != second.token
    assert ledger.marker("s1") is None
    assert ledger.commit(first)
    assert not ledger.commit(second), "a second attempt of a committed shard must not win"
    assert ledger.commit(first), "our own create, retried after its answer was lost, is ours"
    assert ledger.marker("s1") == first and ledger.committed() == {"s1": first}
    assert ledger.committed_names() == ["s1"]


def test_a_marker_for_another_row_range_names_the_other_run(store):
    ledger = Ledger(store)
    assert ledger.commit(_marker("s1"))
    assert ledger.marker("s1", (0, 4)) is not None
    with pytest.raises(JobMismatch, match=r"shard s1 was committed for rows 0\.\.4, not 0\.\.8: another run"):
        ledger.marker("s1", (0, 8))


@pytest.mark.parametrize("fmt", ["files", "webdataset"])
def test_publish_moves_the_staged_files_and_is_idempotent(store, fmt):
    ledger = Ledger(store)
    marker = _marker("s1", fmt)
    _stage(store, marker)
    assert ledger.commit(marker)
    assert not ledger.is_published("s1") and ledger.published_shards() == set()
    ledger.publish(marker)
    assert ledger.is_published("s1") and ledger.published_shards() == {"s1"}
    assert _keys(store, layout.STAGING) == set()
    published = {key: store.get_bytes(key) for key in _final_keys(marker)}
    assert all(data.startswith(marker.token.encode()) for data in published.values())
    ledger.publish(marker)  # again: nothing staged, nothing changes
    ledger.ensure_published(marker)
    assert {key: store.get_bytes(key) for key in _final_keys(marker)} == published


def test_is_published_needs_the_metadata_out_and_nothing_staged(store):
    ledger = Ledger(store)
    marker = _marker("s1")
    store.put_bytes(layout.metadata_key("s1"), b"m")
    assert ledger.is_published("s1")
    store.put_bytes(marker.staging.prefix + layout.tar_key("s1"), b"left over")
    assert not ledger.is_published("s1"), "a staged file left means the publish did not finish"
    store.delete_prefix(layout.STAGING)
    store.delete_prefix(layout.METADATA)
    assert not ledger.is_published("s1")


def test_the_sweep_finishes_committed_publishes_and_removes_dead_attempts(store):
    ledger = Ledger(store)
    killed = _marker("s1")  # committed, its publish never ran
    _stage(store, killed)
    assert ledger.commit(killed)
    loser = _marker("s1")  # an attempt of the same shard that lost the commit
    _stage(store, loser)
    dead = _marker("s2")  # an attempt that never committed
    _stage(store, dead)
    done = _marker("s3")  # published, but a delete under `_staging/` failed
    _stage(store, done)
    assert ledger.commit(done)
    ledger.publish(done)
    store.put_bytes(done.staging.prefix + "stray", b"x")
    lines: list[str] = []
    assert ledger.sweep_staging(echo=lines.append) == ["s1"]
    assert _keys(store, layout.STAGING) == set()
    assert ledger.is_published("s1") and ledger.is_published("s3") and not store.exists(layout.metadata_key("s2"))
    assert store.get_bytes(layout.tar_key("s1")).startswith(killed.token.encode()), "the committed attempt's files"
    assert any("published shard s1" in line for line in lines)
    assert any("removed the staged files of 1 shard(s)" in line for line in lines)
    assert ledger.sweep_staging(ledger.committed(), echo=lines.append) == []  # nothing left to do


def test_shards_that_can_never_be_published_are_forgotten_whole(store):
    ledger = Ledger(store)
    lost = _marker("s1")  # committed; its staged files and metadata gone (deleted by hand)
    assert ledger.commit(lost)
    store.put_bytes(layout.tar_key("s1"), b"half")
    kept = _marker("s2")
    _stage(store, kept)
    assert ledger.commit(kept)
    ledger.publish(kept)
    assert ledger.forget_lost(ledger.committed()) == ["s1"]
    assert ledger.committed_names() == ["s2"]
    assert not store.exists(layout.tar_key("s1")) and not store.exists(layout.commit_key("s1"))
    assert ledger.is_published("s2") and ledger.forget_lost(ledger.committed()) == []
