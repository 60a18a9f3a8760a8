"""Manifests written by other tools. `large_string` (pandas), `string_view` (Polars'
newest compat level), dictionary strings, `large_binary` and `binary_view` are read as `string`
and `binary` everywhere: validation, planning digests, the rows workers read and the metadata's
pass-through columns. Integer ids are their decimal text.

pyarrow (>= 16) writes `string_view` columns to Parquet and reads them back as `string_view`
(the Arrow schema is stored in the file), as Polars' files are read: the files below hold them.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_in_process import cli_in_process
from output_check import check_exactly_once

from zimage_batch.inputs.identity import digest_matches, rows_digest
from zimage_batch.inputs.manifest import open_manifest
from zimage_batch.inputs.validation import Limits, validate_manifest
from zimage_batch.output.ledger import CommitMarker, JobMismatch
from zimage_batch.run.plan import make_plan, shard_name

LIMITS = Limits("turbo", 64, 64, 8, 0.0)
STRING_TYPES = {
    "string": lambda values: pa.array(values, pa.string()),
    "large_string": lambda values: pa.array(values, pa.large_string()),
    "string_view": lambda values: pa.array(values, pa.string_view()),
    "dictionary": lambda values: pa.array(values, pa.string()).dictionary_encode(),
}


def _write(path: Path, string_type: str, n: int = 5) -> Path:
    make = STRING_TYPES[string_type]
    ids = [f"r{i}" for i in range(n)]
    pq.write_table(pa.table({
        "id": make(ids),
        "prompt": make([f"a cat {i}" for i in range(n)]),
        "caption": make([None if i == 1 else f"caption {i}" for i in range(n)]),
        "tags": pa.array([[f"t{i}", "x"] for i in range(n)], pa.list_(pa.string_view())),
        "blob": pa.array([bytes([i]) for i in range(n)], pa.large_binary()),
        "view_blob": pa.array([bytes([i, i]) for i in range(n)], pa.binary_view()),
    }), path, row_group_size=2)
    return path


@pytest.mark.parametrize("string_type", list(STRING_TYPES))
def test_every_string_type_reads_as_string(tmp_path, string_type):
    path = _write(tmp_path / "m.parquet", string_type)
    assert pq.read_schema(path).field("id").type == STRING_TYPES[string_type](["x"]).type  # stored as is
    manifest = open_manifest(str(path))
    validate_manifest(manifest, LIMITS)
    f = manifest.files[0]
    plain = {"id": pa.string(), "prompt": pa.string(), "caption": pa.string(), "tags": pa.list_(pa.string()),
             "blob": pa.binary(), "view_blob": pa.binary()}
    assert {field.name: field.type for field in f.schema} == plain
    assert {field.name: field.type for field in manifest.passthrough} == {
        k: plain[k] for k in ("caption", "tags", "blob", "view_blob")}
    rows = manifest.read_rows(f, 1, 4)
    assert rows.schema.equals(pa.schema(plain.items()))
    assert rows.column("id").to_pylist() == ["r1", "r2", "r3"]
    assert rows.column("caption").to_pylist() == [None, "caption 2", "caption 3"]
    assert manifest.read_column(f, "id").type == pa.string()
    batches = list(manifest.iter_batches(f, batch_size=2))
    assert all(b.schema.equals(pa.schema(plain.items())) for b in batches)


def test_digest_does_not_depend_on_the_string_type(tmp_path):
    """The same values give the same digest whatever the stored string type; a plain `string`
    manifest's digest is the one earlier versions committed (same table, same hash)."""
    digests = set()
    for string_type in STRING_TYPES:
        manifest = open_manifest(str(_write(tmp_path / f"{string_type}.parquet", string_type)))
        digests.add(rows_digest(manifest.read_rows(manifest.files[0], 0, 5)))
    assert len(digests) == 1
    plain_schema = open_manifest(str(tmp_path / "string.parquet")).files[0].schema
    plain = tmp_path / "plain.parquet"  # only plain types: read exactly as stored, as before
    pq.write_table(pq.read_table(tmp_path / "string.parquet").cast(plain_schema), plain)
    manifest = open_manifest(str(plain))
    as_stored = pq.read_table(plain)
    assert manifest.read_rows(manifest.files[0], 0, 5).equals(as_stored)
    assert rows_digest(as_stored) in digests


def test_commits_of_large_string_manifests_made_before_still_match(tmp_path):
    """Earlier versions hashed a `large_string` manifest's rows as large strings (pandas 3 writes
    them): such a commit marker must not make the OUTPUT a 'different job'."""
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": pa.array(["a", "b", "c"], pa.large_string()),
                             "prompt": pa.array(["x", "y", "z"], pa.large_string()),
                             "note": pa.array([b"1", b"2", b"3"], pa.large_binary())}), path)
    manifest = open_manifest(str(path))
    f = manifest.files[0]
    rows = manifest.read_rows(f, 0, 2)
    assert rows.schema.field("id").type == pa.string()
    as_before = rows_digest(pq.read_table(path).slice(0, 2))  # the table earlier versions read and hashed
    assert as_before != rows_digest(rows) and digest_matches(f, rows, as_before)
    name = shard_name(f, 0)
    marker = CommitMarker(shard=name, file=f.name, start=0, end=2, rows=2, ok=2, error=0, digest=as_before,
                          fingerprint="f", format="files")
    committed = {name: marker}
    plan = make_plan(manifest, committed, shard_size=2)
    assert [(s.start, s.end) for s in plan.todo] == [(2, 3)]
    pq.write_table(pa.table({"id": pa.array(["a", "B", "c"], pa.large_string()),
                             "prompt": pa.array(["x", "y", "z"], pa.large_string()),
                             "note": pa.array([b"1", b"2", b"3"], pa.large_binary())}), path)
    with pytest.raises(JobMismatch, match="changed since shard"):
        make_plan(open_manifest(str(path)), committed, shard_size=2)


@pytest.mark.parametrize("int_type", [pa.int8(), pa.int32(), pa.int64(), pa.uint16(), pa.uint64()])
def test_integer_ids_are_their_decimal_text(tmp_path, int_type):
    values = [0, 5, 100] + ([2**64 - 1] if int_type == pa.uint64() else [-7] if int_type == pa.int8() else [9])
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": pa.array(values, int_type), "prompt": ["p"] * 4}), path)
    manifest = open_manifest(str(path))
    validate_manifest(manifest, LIMITS)
    assert manifest.files[0].schema.field("id").type == pa.string()
    assert manifest.read_rows(manifest.files[0], 0, 4).column("id").to_pylist() == [str(v) for v in values]


def test_integer_and_text_ids_share_one_namespace(tmp_path):
    """Id 7 in one file and "7" in another are the same id: refused as a duplicate."""
    folder = tmp_path / "manifest"
    folder.mkdir()
    pq.write_table(pa.table({"id": pa.array([1, 7], pa.int64()), "prompt": ["a", "b"]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"id": ["x", "7"], "prompt": ["c", "d"]}), folder / "part-1.parquet")
    with pytest.raises(ValueError, match=r"duplicate ids: '7' \(part-0.parquet row 1, part-1.parquet row 1\)"):
        validate_manifest(open_manifest(str(folder)), LIMITS)


# ---------------------------------------------------------------------- end to end, through the CLI
def _run_twice(manifest: Path, out: Path) -> None:
    """Run to the end, then again: the second plan's digests agree with the commits (0 to run)."""
    args = ["run", "--manifest", str(manifest), "--output", str(out), "--model", "tiny:turbo",
            "--shard-size", "2", "--set", "report=false"]
    first = cli_in_process(*args)
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    again = cli_in_process(*args)
    assert again.returncode == 0 and "0 to run" in again.stdout, again.stdout + again.stderr[-3000:]


def _duckdb(query: str) -> list[tuple]:
    with duckdb.connect() as db:
        return db.execute(query).fetchall()


def test_string_view_manifest_end_to_end(tmp_path, ray_local):
    """`string_view` ids and pass-through columns (as Polars writes them) run, and the metadata
    globbed with DuckDB holds every row once, ok, with its pass-through values as text."""
    manifest = tmp_path / "m.parquet"
    n = 4
    pq.write_table(pa.table({
        "id": pa.array([f"sv-{i}" for i in range(n)], pa.string_view()),
        "prompt": pa.array([f"a cat {i}" for i in range(n)], pa.string_view()),
        "caption": pa.array(["一只猫", None, "a dog", "x"], pa.string_view()),
        "source_db": pa.array(["pg", "pg", "mysql", "pg"], pa.large_string()),
        "tags": pa.array([["a"], [], ["b", "c"], None], pa.list_(pa.string_view())),
    }), manifest)
    assert pq.read_schema(manifest).field("caption").type == pa.string_view()
    assert cli_in_process("validate", str(manifest)).returncode == 0
    out = tmp_path / "out"
    _run_twice(manifest, out)
    check_exactly_once(str(out), [f"sv-{i}" for i in range(n)])
    glob = f"'{out}/metadata/*.parquet'"
    rows = _duckdb(f"SELECT id, status, caption, source_db, tags, typeof(caption), typeof(id) FROM {glob} ORDER BY id")
    assert rows == [
        ("sv-0", "ok", "一只猫", "pg", ["a"], "VARCHAR", "VARCHAR"),
        ("sv-1", "ok", None, "pg", [], "VARCHAR", "VARCHAR"),
        ("sv-2", "ok", "a dog", "mysql", ["b", "c"], "VARCHAR", "VARCHAR"),
        ("sv-3", "ok", "x", "pg", None, "VARCHAR", "VARCHAR"),
    ]
    for path in (out / "metadata").glob("*.parquet"):
        assert pq.read_schema(path).field("caption").type == pa.string()


def test_integer_id_manifest_end_to_end(tmp_path, ray_local):
    """int64 ids (as DuckDB and pandas write them) run; keys and metadata use the decimal text."""
    manifest = tmp_path / "m.parquet"
    ids = [10, 2, 2**40, -4]
    pq.write_table(pa.table({
        "id": pa.array(ids, pa.int64()),
        "prompt": [f"a dog {i}" for i in range(len(ids))],
        "score": [0.5, 1.5, 2.5, 3.5],
    }), manifest)
    out = tmp_path / "out"
    _run_twice(manifest, out)
    rows = check_exactly_once(str(out), [str(i) for i in ids])
    assert all(r["status"] == "ok" and (out / r["image"]).is_file() for r in rows)
    glob = f"'{out}/metadata/*.parquet'"
    assert _duckdb(f"SELECT id, status, score, typeof(id) FROM {glob} ORDER BY score") == [
        ("10", "ok", 0.5, "VARCHAR"), ("2", "ok", 1.5, "VARCHAR"), (str(2**40), "ok", 2.5, "VARCHAR"),
        ("-4", "ok", 3.5, "VARCHAR")]
