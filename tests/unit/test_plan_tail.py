"""The plan's last shards cut smaller (run/tail.py): the pieces tile their shards, are named by
their start row like any shard, shrink towards the end, and a resume after a cut plans around
the committed pieces without ever covering a row twice."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zimage_batch.inputs.identity import rows_digest
from zimage_batch.inputs.manifest import open_manifest
from zimage_batch.output.ledger import CommitMarker
from zimage_batch.output.overlaps import find_overlaps
from zimage_batch.run.plan import Shard, make_plan, shard_name
from zimage_batch.run.tail import TAIL_MIN_ROWS, TAIL_ROUNDS, cut_tail, piece_rows


def plain(rows: int, size: int, files: tuple[str, ...] = ("a.parquet",)) -> list[Shard]:
    return [Shard(shard_name(f, s), f, s, min(s + size, rows)) for f in files for s in range(0, rows, size)]


def assert_tiles(before: list[Shard], after: list[Shard]) -> None:
    """`after` cuts each shard of `before` into contiguous pieces, in order, each named by its
    own start row (the first keeps its shard's name)."""
    position = 0
    for whole in before:
        inside = []
        while position < len(after) and after[position].file == whole.file and after[position].start < whole.end:
            inside.append(after[position])
            position += 1
        assert inside and inside[0].start == whole.start and inside[-1].end == whole.end, whole
        assert all(a.end == b.start for a, b in zip(inside, inside[1:])), whole
        assert inside[0].name == whole.name
    assert position == len(after)
    assert [p.name for p in after] == [shard_name(p.file, p.start) for p in after]


def test_only_the_last_rounds_of_shards_are_cut_and_they_shrink_towards_the_end():
    workers, size = 10, 1000
    before = plain(100_000, size)
    after = cut_tail(before, workers)
    assert_tiles(before, after)
    tail_rows = TAIL_ROUNDS * workers * size
    untouched = [s for s in before if s.end <= before[-1].end - tail_rows]
    assert after[:len(untouched)] == untouched  # the bulk keeps its shards and names
    pieces = after[len(untouched):]
    assert len(pieces) > TAIL_ROUNDS * workers
    for k, piece in enumerate(pieces):  # each about the rows left over TAIL_ROUNDS x workers, down to the floor
        left = sum(p.num_rows for p in pieces[k:])
        assert TAIL_MIN_ROWS <= piece.num_rows < piece_rows(left, workers, size) + TAIL_MIN_ROWS
    assert pieces[-1].num_rows < 2 * TAIL_MIN_ROWS and pieces[0].num_rows > 10 * TAIL_MIN_ROWS


def test_each_piece_holds_the_rows_left_over_a_few_times_the_workers():
    assert piece_rows(TAIL_ROUNDS * 1_000_000, 1000, 1000) == 1000
    assert piece_rows(TAIL_ROUNDS * 500_000, 1000, 1000) == 500
    assert piece_rows(1000, 1000, 1000) == TAIL_MIN_ROWS


def test_pieces_of_several_files_keep_their_file():
    before = plain(3000, 500, ("a.parquet", "b.parquet"))
    after = cut_tail(before, 4)
    assert_tiles(before, after)
    assert {p.file for p in after} == {"a.parquet", "b.parquet"} and len(after) > len(before)


@pytest.mark.parametrize("workers, size", [(1, 1000), (8, 50), (8, TAIL_MIN_ROWS + 1)])
def test_one_worker_or_small_shards_leave_the_plan_as_it_is(workers, size):
    before = plain(20 * size, size)
    assert cut_tail(before, workers) == before


def test_mixed_variant_shards_are_kept_whole():
    """A mixed-variant shard holds only its variant's rows of its range: it is never cut."""
    before = [Shard(shard_name("a.parquet", s, "base"), "a.parquet", s, s + 1000, "base", 600) for s in range(0, 8000, 1000)]
    assert cut_tail(before, 4) == before


def test_a_resume_after_a_cut_plans_around_the_committed_pieces(tmp_path):
    """Run 1 committed some of its cut pieces (not others); run 2, with another shard size and
    worker count, plans only rows no piece covers, and nothing overlaps."""
    path = tmp_path / "m.parquet"
    rows = 4000
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)], "prompt": ["p"] * rows}), path,
                   row_group_size=700)
    manifest = open_manifest(str(path))
    f = manifest.files[0]
    first = cut_tail(make_plan(manifest, {}, 1000).todo, 3)
    assert len(first) > 4
    committed = {}
    for piece in first[::2]:  # every other piece committed
        digest = rows_digest(manifest.read_rows(f, piece.start, piece.end))
        committed[piece.name] = CommitMarker(shard=piece.name, file=f.name, start=piece.start, end=piece.end,
                                             rows=piece.num_rows, ok=piece.num_rows, error=0, digest=digest,
                                             fingerprint="f", format="files")
    second = cut_tail(make_plan(open_manifest(str(path)), committed, 300).todo, 5)
    covered = sorted([(m.start, m.end) for m in committed.values()] + [(s.start, s.end) for s in second])
    assert covered[0][0] == 0 and covered[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # every row once: no gap, no overlap
    assert not set(committed) & {s.name for s in second}
    markers = list(committed.values()) + [
        CommitMarker(shard=s.name, file=f.name, start=s.start, end=s.end, rows=s.num_rows, ok=s.num_rows, error=0,
                     digest="d", fingerprint="f", format="files") for s in second]
    assert find_overlaps(markers) == []
