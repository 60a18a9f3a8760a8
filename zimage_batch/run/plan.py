"""Planning: cut a manifest into shards with stable identities and skip committed ones.

A shard is a row range [start, end) of one manifest file, named after the file and its start
row. Committed shards are never re-cut: rows they do not cover (new rows appended to a file, or
new files) form new shards. So appending to a manifest never changes an existing shard, and a
changed `--shard-size` only affects rows not yet done.

When rows name different variants (a `variant` column), each variant's rows of a range form
their own shard (`<file>-<start>-<variant>` for variants other than the job's), so that each
shard runs on a worker pool holding that variant's model.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from zimage_batch.inputs.identity import digest_matches, rows_of_variant
from zimage_batch.inputs.manifest import Manifest, ManifestFile
from zimage_batch.output.ledger import CommitMarker, JobMismatch


@dataclass(frozen=True)
class Shard:
    name: str
    file: str  # ManifestFile.name
    start: int
    end: int
    variant: str | None = None  # only this variant's rows of the range (mixed-variant manifests)
    rows: int | None = None  # rows it holds, when not the whole range

    @property
    def num_rows(self) -> int:
        return self.end - self.start if self.rows is None else self.rows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    todo: list[Shard]
    done: dict[str, CommitMarker]  # committed markers by shard name
    total_rows: int

    @property
    def rows_done(self) -> int:
        return sum(m.rows for m in self.done.values())

    @property
    def rows_todo(self) -> int:
        return sum(s.num_rows for s in self.todo)


def file_tag(name: str) -> str:
    """Readable, unique, path-safe tag for a manifest file name."""
    stem = name.rsplit(".", 1)[0]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")[-40:].strip("_-") or "part"
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def shard_name(f: ManifestFile | str, start: int, variant: str | None = None) -> str:
    name = f"{file_tag(f if isinstance(f, str) else f.name)}-{start:010d}"
    return name if variant is None else f"{name}-{variant}"


def make_plan(
    manifest: Manifest, committed: dict[str, CommitMarker], shard_size: int, job_variant: str | None = None
) -> Plan:
    """Shards still to run, after checking that committed shards' rows are unchanged."""
    by_file: dict[str, list[CommitMarker]] = {}
    for marker in committed.values():
        by_file.setdefault(marker.file, []).append(marker)
    names = {f.name for f in manifest.files}
    gone = sorted(set(by_file) - names)
    if gone:
        raise JobMismatch(f"manifest file(s) {', '.join(gone)} held committed rows and are gone from the manifest; "
                           "put them back, or use --overwrite to start over")
    mixed = job_variant is not None and "variant" in manifest.schema.names
    todo: list[Shard] = []
    for f in manifest.files:
        markers = by_file.get(f.name, [])
        if not mixed:
            markers.sort(key=lambda m: m.start)
            _verify_committed(manifest, f, markers)
            todo.extend(_cut_gaps(f, [(m.start, m.end) for m in markers], shard_size))
            continue
        variants = manifest.read_column(f, "variant").fill_null(job_variant)
        for variant in sorted(set(variants.unique().to_pylist()), key=lambda v: (v != job_variant, v)):
            mine = sorted((m for m in markers if (m.variant or job_variant) == variant), key=lambda m: m.start)
            _verify_committed(manifest, f, mine, lambda t, v=variant: rows_of_variant(t, v, job_variant))
            suffix = None if variant == job_variant else variant
            for shard in _cut_gaps(f, [(m.start, m.end) for m in mine], shard_size, suffix):
                count = pc.sum(pc.equal(variants.slice(shard.start, shard.end - shard.start), variant)).as_py() or 0
                if count:
                    todo.append(Shard(shard.name, f.name, shard.start, shard.end, variant, count))
    return Plan(todo=todo, done=committed, total_rows=manifest.num_rows)


def _cut_gaps(f: ManifestFile, covered: list[tuple[int, int]], shard_size: int, variant: str | None = None) -> Iterator[Shard]:
    position = 0
    for start, end in covered + [(f.num_rows, f.num_rows)]:
        for s in range(position, start, shard_size):
            yield Shard(shard_name(f, s, variant), f.name, s, min(s + shard_size, start))
        position = max(position, end)


def _verify_committed(
    manifest: Manifest,
    f: ManifestFile,
    markers: list[CommitMarker],
    select: Callable[[pa.Table], pa.Table] | None = None,
) -> None:
    """Stream the file once and compare each committed range (its `select`ed rows) with its digest."""
    if not markers:
        return
    if markers[-1].end > f.num_rows:
        raise JobMismatch(f"{f.name}: rows committed by an earlier run are missing (the file now has {f.num_rows} rows); "
                          "put them back, or use --overwrite to start over")
    pending = iter(markers)
    current = next(pending)
    pieces: list[pa.Table] = []
    offset = 0
    for batch in manifest.iter_batches(f):
        batch_start, batch_end = offset, offset + batch.num_rows
        offset = batch_end
        while current is not None and current.start < batch_end:
            lo, hi = max(current.start, batch_start), min(current.end, batch_end)
            if hi > lo:
                pieces.append(pa.Table.from_batches([batch.slice(lo - batch_start, hi - lo)]))
            if current.end > batch_end:
                break
            table = pa.concat_tables(pieces) if pieces else None
            pieces = []
            if table is not None and select is not None:
                table = select(table)
            if table is None or not digest_matches(f, table, current.digest):
                raise JobMismatch(
                    f"{f.name}: rows {current.start}..{current.end - 1} changed since shard "
                    f"{current.shard} was committed; this is a different job (use --overwrite to start over)"
                )
            current = next(pending, None)
        if current is None:
            break
