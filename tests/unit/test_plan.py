"""Planning (run/plan.py): a file is cut into shards named after it and their first row; a resume
runs only the rows no committed shard covers, whatever the shard size now; rows changed or gone
under a committed shard are another job."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zimage_batch.inputs.identity import rows_digest
from zimage_batch.inputs.manifest import open_manifest
from zimage_batch.output.ledger import CommitMarker, JobMismatch
from zimage_batch.run.plan import Shard, file_tag, make_plan, shard_name


def _manifest(folder, rows: dict[str, int]) -> str:
    """A folder of parquet files, `rows[name]` rows each."""
    folder.mkdir(exist_ok=True)
    for name, n in rows.items():
        pq.write_table(pa.table({"id": [f"{name}-{i}" for i in range(n)], "prompt": [f"a fox #{i}" for i in range(n)]}),
                       folder / name, row_group_size=7)  # ranges cross row groups
    return str(folder)


def _commit(manifest: str, shards: list[Shard]) -> dict[str, CommitMarker]:
    """Markers for `shards`, as workers write them."""
    m = open_manifest(manifest)
    files = {f.name: f for f in m.files}
    markers = {}
    for s in shards:
        table = m.read_rows(files[s.file], s.start, s.end)
        markers[s.name] = CommitMarker(shard=s.name, file=s.file, start=s.start, end=s.end, rows=table.num_rows,
                                       ok=table.num_rows, error=0, digest=rows_digest(table), fingerprint="f",
                                       format="files")
    return markers


def _ranges(plan) -> list[tuple[str, int, int]]:
    return [(s.file, s.start, s.end) for s in plan.todo]


def test_a_file_is_cut_into_shards_named_after_it_and_their_first_row(tmp_path):
    manifest = _manifest(tmp_path / "m", {"a.parquet": 25, "b.parquet": 3})
    plan = make_plan(open_manifest(manifest), {}, 10)
    assert _ranges(plan) == [("a.parquet", 0, 10), ("a.parquet", 10, 20), ("a.parquet", 20, 25), ("b.parquet", 0, 3)]
    assert [s.name for s in plan.todo] == [shard_name("a.parquet", 0), shard_name("a.parquet", 10),
                                           shard_name("a.parquet", 20), shard_name("b.parquet", 0)]
    assert plan.todo[1].name == f"{file_tag('a.parquet')}-0000000010" and plan.todo[1].num_rows == 10
    assert (plan.total_rows, plan.rows_todo, plan.rows_done) == (28, 28, 0)
    assert len({s.name for s in plan.todo}) == 4
    assert file_tag("a.parquet") != file_tag("a_parquet") and "/" not in file_tag("x/../y z.parquet")


def test_a_resume_runs_only_rows_no_committed_shard_covers(tmp_path):
    manifest = _manifest(tmp_path / "m", {"a.parquet": 25})
    first = make_plan(open_manifest(manifest), {}, 10)
    committed = _commit(manifest, [first.todo[0], first.todo[2]])
    plan = make_plan(open_manifest(manifest), committed, 10)
    assert _ranges(plan) == [("a.parquet", 10, 20)] and plan.todo[0] == first.todo[1]
    assert (plan.rows_done, plan.rows_todo) == (15, 10) and plan.done == committed
    everything = _commit(manifest, first.todo)
    assert make_plan(open_manifest(manifest), everything, 10).todo == []


def test_appended_rows_and_files_form_new_shards_and_leave_committed_ones(tmp_path):
    manifest = _manifest(tmp_path / "m", {"a.parquet": 12})
    committed = _commit(manifest, make_plan(open_manifest(manifest), {}, 10).todo)  # 0..10, 10..12
    _manifest(tmp_path / "m", {"a.parquet": 30, "b.parquet": 4})  # rows appended to a, and a new file
    plan = make_plan(open_manifest(manifest), committed, 10)
    assert _ranges(plan) == [("a.parquet", 12, 22), ("a.parquet", 22, 30), ("b.parquet", 0, 4)]


def test_a_changed_shard_size_cuts_only_the_rows_not_yet_done(tmp_path):
    manifest = _manifest(tmp_path / "m", {"a.parquet": 40})
    first = make_plan(open_manifest(manifest), {}, 10)
    committed = _commit(manifest, [first.todo[0], first.todo[2]])  # 0..10 and 20..30
    smaller = make_plan(open_manifest(manifest), committed, 4)
    assert _ranges(smaller) == [("a.parquet", 10, 14), ("a.parquet", 14, 18), ("a.parquet", 18, 20),
                                ("a.parquet", 30, 34), ("a.parquet", 34, 38), ("a.parquet", 38, 40)]
    larger = make_plan(open_manifest(manifest), committed, 25)
    assert _ranges(larger) == [("a.parquet", 10, 20), ("a.parquet", 30, 40)]
    names = {s.name for s in smaller.todo} | {s.name for s in larger.todo}
    assert not names & set(committed), "a new shard never takes a committed shard's name"


def test_rows_changed_under_a_committed_shard_are_another_job(tmp_path):
    manifest = _manifest(tmp_path / "m", {"a.parquet": 20})
    committed = _commit(manifest, make_plan(open_manifest(manifest), {}, 10).todo)
    table = pq.read_table(tmp_path / "m" / "a.parquet")
    prompts = table.column("prompt").to_pylist()
    prompts[13] = "a changed prompt"
    pq.write_table(table.set_column(1, "prompt", pa.array(prompts)), tmp_path / "m" / "a.parquet")
    with pytest.raises(JobMismatch, match=r"a\.parquet: rows 10\.\.19 changed since shard .*-0000000010 was committed"):
        make_plan(open_manifest(manifest), committed, 10)


def test_rows_or_files_gone_under_committed_shards_are_another_job(tmp_path):
    manifest = _manifest(tmp_path / "m", {"a.parquet": 20, "b.parquet": 5})
    committed = _commit(manifest, make_plan(open_manifest(manifest), {}, 10).todo)
    _manifest(tmp_path / "m", {"a.parquet": 15})
    with pytest.raises(JobMismatch, match=r"a\.parquet: rows committed by an earlier run are missing \(the file now has 15"):
        make_plan(open_manifest(manifest), committed, 10)
    (tmp_path / "m" / "b.parquet").unlink()
    _manifest(tmp_path / "m", {"a.parquet": 20})
    with pytest.raises(JobMismatch, match=r"manifest file\(s\) b\.parquet held committed rows and are gone"):
        make_plan(open_manifest(manifest), committed, 10)
