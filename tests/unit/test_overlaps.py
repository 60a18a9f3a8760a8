"""Overlapping committed shards: found, the later one named, the unpublished ones settled."""

from __future__ import annotations

import random

from zimage_batch.output import layout
from zimage_batch.output.ledger import CommitMarker, Ledger
from zimage_batch.output.overlaps import find_overlaps, overlap_line, settle_overlaps, without_extras
from zimage_batch.storage import open_storage


def marker(shard, start, end, finished, file="a.parquet", variant=None, run="r1"):
    return CommitMarker(shard=shard, file=file, start=start, end=end, rows=end - start, ok=end - start, error=0,
                        digest="d", fingerprint="f", format="parquet", variant=variant, finished=finished, run=run)


def test_the_later_of_two_crossing_shards_is_the_extra():
    early, late = marker("a-40", 40, 50, finished=1.0), marker("a-47", 47, 54, finished=2.0)
    overlaps = find_overlaps([late, early])
    assert [(o.kept.shard, o.extra.shard) for o in overlaps] == [("a-40", "a-47")]
    assert overlaps[0].describe() == "shard a-47 (rows 47..53) overlaps shard a-40 (rows 40..49) of a.parquet"
    assert without_extras([early, late], overlaps) == [early]
    line = overlap_line("out", overlaps)
    assert "\n" not in line and "zimage-batch repair out" in line


def test_touching_ranges_other_files_and_other_variants_do_not_overlap():
    markers = [marker("a-0", 0, 10, 1.0), marker("a-10", 10, 20, 2.0), marker("b-0", 0, 10, 3.0, file="b.parquet"),
               marker("c-0-base", 0, 10, 4.0, file="c", variant="base"),
               marker("c-0-omni", 0, 10, 5.0, file="c", variant="omni")]
    assert find_overlaps(markers) == []
    # a shard without a variant holds every variant's rows of its range
    assert [o.extra.shard for o in find_overlaps([*markers[3:], marker("x", 5, 6, 9.0, file="c")])] == ["x"]


def test_a_published_shard_is_kept_before_an_earlier_unpublished_one():
    published, unpublished = marker("a-0", 0, 10, finished=5.0), marker("a-5", 5, 15, finished=1.0)
    overlaps = find_overlaps([published, unpublished], published={"a-0"})
    assert [(o.kept.shard, o.extra.shard) for o in overlaps] == [("a-0", "a-5")]


def test_kept_shards_never_share_a_row_on_random_layouts():
    rng = random.Random(7)
    for _ in range(50):
        markers = []
        for k in range(30):
            start = rng.randrange(0, 200)
            markers.append(marker(f"s{k}", start, start + rng.randrange(1, 30), rng.random(),
                                  variant=rng.choice([None, "base", "turbo"])))
        kept = without_extras(markers, overlaps := find_overlaps(markers))
        assert len(kept) + len(overlaps) == len(markers)
        for i, a in enumerate(kept):
            for b in kept[i + 1:]:
                same_variant = a.variant is None or b.variant is None or a.variant == b.variant
                assert not (same_variant and a.start < b.end and b.start < a.end), (a, b)


def test_settling_removes_unpublished_extras_whole_and_returns_published_overlaps(tmp_path):
    storage = open_storage(str(tmp_path))
    ledger = Ledger(storage)
    shards = [marker("a-0", 0, 10, 1.0), marker("a-5", 5, 15, 2.0, run="stale"), marker("a-8", 8, 12, 3.0)]
    for m in shards:
        assert ledger.commit(m)
        for key in (layout.parquet_key(m.shard), layout.metadata_key(m.shard)):
            storage.put_bytes(layout.StagingArea(m.shard, m.token).prefix + key, b"x")
    for m in (shards[0], shards[2]):  # a-0 and a-8 published, a-5 (a run that lost its lease) never
        ledger.publish(m)
    lines = []
    left, overlaps = settle_overlaps(ledger, ledger.committed(), lines.append)
    assert sorted(left) == ["a-0", "a-8"]
    assert [(o.kept.shard, o.extra.shard) for o in overlaps] == [("a-0", "a-8")]
    assert not storage.exists(layout.commit_key("a-5")) and not list(storage.list(layout.shard_staging_prefix("a-5")))
    assert len(lines) == 1 and "a-5" in lines[0] and "stale" in lines[0] and "never published" in lines[0]
