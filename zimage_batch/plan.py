"""Planning: cut a manifest into shards with stable identities and skip committed ones.

A shard is a row range [start, end) of one manifest file, named after the file and its start
row. Committed shards are never re-cut: rows they do not cover (new rows appended to a file, or
new files) form new shards. So appending to a manifest never changes an existing shard, and a
changed `--shard-size` only affects rows not yet done.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import pyarrow as pa

from .ledger import JobMismatch
from .manifest import Manifest, ManifestFile, rows_digest


@dataclass(frozen=True)
class Shard:
    name: str
    file: str  # ManifestFile.name
    start: int
    end: int

    @property
    def num_rows(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    todo: list[Shard]
    done: dict[str, dict[str, Any]]  # committed markers by shard name
    total_rows: int

    @property
    def rows_done(self) -> int:
        return sum(m["rows"] for m in self.done.values())

    @property
    def rows_todo(self) -> int:
        return sum(s.num_rows for s in self.todo)


def file_tag(name: str) -> str:
    """Readable, unique, path-safe tag for a manifest file name."""
    stem = name.rsplit(".", 1)[0]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")[-40:].strip("_-") or "part"
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def shard_name(f: ManifestFile | str, start: int) -> str:
    return f"{file_tag(f if isinstance(f, str) else f.name)}-{start:010d}"


def make_plan(manifest: Manifest, committed: dict[str, dict[str, Any]], shard_size: int) -> Plan:
    """Shards still to run, after checking that committed shards' rows are unchanged."""
    by_file: dict[str, list[dict[str, Any]]] = {}
    for marker in committed.values():
        by_file.setdefault(marker["file"], []).append(marker)
    names = {f.name for f in manifest.files}
    gone = sorted(set(by_file) - names)
    if gone:
        raise JobMismatch(f"manifest file(s) {', '.join(gone)} held committed rows and are gone from the manifest")
    todo: list[Shard] = []
    for f in manifest.files:
        markers = sorted(by_file.get(f.name, []), key=lambda m: m["start"])
        _verify_committed(manifest, f, markers)
        todo.extend(_cut_gaps(f, [(m["start"], m["end"]) for m in markers], shard_size))
    return Plan(todo=todo, done=committed, total_rows=manifest.num_rows)


def _cut_gaps(f: ManifestFile, covered: list[tuple[int, int]], shard_size: int) -> Iterator[Shard]:
    position = 0
    for start, end in covered + [(f.num_rows, f.num_rows)]:
        for s in range(position, start, shard_size):
            yield Shard(shard_name(f, s), f.name, s, min(s + shard_size, start))
        position = max(position, end)


def _verify_committed(manifest: Manifest, f: ManifestFile, markers: list[dict[str, Any]]) -> None:
    """Stream the file once and compare each committed range with its recorded digest."""
    if not markers:
        return
    if markers[-1]["end"] > f.num_rows:
        raise JobMismatch(f"{f.name}: rows committed by an earlier run are missing (the file now has {f.num_rows} rows)")
    pending = iter(markers)
    current = next(pending)
    pieces: list[pa.Table] = []
    offset = 0
    for batch in manifest.iter_batches(f):
        batch_start, batch_end = offset, offset + batch.num_rows
        offset = batch_end
        while current is not None and current["start"] < batch_end:
            lo, hi = max(current["start"], batch_start), min(current["end"], batch_end)
            if hi > lo:
                pieces.append(pa.Table.from_batches([batch.slice(lo - batch_start, hi - lo)]))
            if current["end"] > batch_end:
                break
            table = pa.concat_tables(pieces) if pieces else None
            pieces = []
            if table is None or rows_digest(table) != current["digest"]:
                raise JobMismatch(
                    f"{f.name}: rows {current['start']}..{current['end'] - 1} changed since shard "
                    f"{current['shard']} was committed; this is a different job (use --overwrite to start over)"
                )
            current = next(pending, None)
        if current is None:
            break
