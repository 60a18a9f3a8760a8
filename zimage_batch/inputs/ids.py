"""The duplicate-id check at 10^8 rows: 8 bytes an id, not the ids themselves.

Keeping every id (Arrow strings plus a hash table) took 1.37 GiB of driver memory at 10^7 rows,
so 10^8 rows would not fit a 4 GiB driver. Instead:

1. while validation streams the manifest, each id is reduced to a 64-bit digest (a linear hash
   of its UTF-8 bytes with random 64-bit weights per position, computed with numpy over Arrow's
   buffers) into one preallocated array: 8 bytes a row, up to MEMORY_BUDGET (32 M rows);
   beyond, the array is a buffer whose digests go, by their top bits, to spill files on the
   local scratch disk (`scratch.py`), so memory does not grow with the rows (10^9: 8 GB on disk);
2. the array, or each spill file in turn, is sorted; equal neighbours are the candidate
   duplicates;
3. only if there are any, a second pass reads the id column again and compares the ids whose
   digest is a candidate exactly, so a digest collision (about one pair in 10^4 manifests of
   10^8 rows) never refuses a good manifest, and real duplicates are named with file and row.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from zimage_batch import scratch

CHUNK_BYTES = 1 << 22  # id bytes hashed at a time (bounds the temporary arrays to a few tens of MB)
TRACKED = 100_000  # candidate digests compared exactly per pass over the ids
MEMORY_BUDGET = 256 << 20  # bytes of digests in memory (32 M rows); more spill to scratch files
_WEIGHT_BLOCK = 1 << 12


class _Weights:
    """Random odd 64-bit weights, one per byte position, the same in every process."""

    def __init__(self) -> None:
        self.table = np.empty(0, np.uint64)

    def upto(self, n: int) -> np.ndarray:
        while len(self.table) < n:
            block = len(self.table) // _WEIGHT_BLOCK
            rng = np.random.default_rng([0x5A1D, block])
            more = rng.integers(0, np.iinfo(np.uint64).max, _WEIGHT_BLOCK, dtype=np.uint64, endpoint=True) | np.uint64(1)
            self.table = np.concatenate([self.table, more])
        return self.table


_WEIGHTS = _Weights()


def id_digests(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A uint64 digest of each id (non-null strings); equal ids give equal digests."""
    values = pc.cast(ids, pa.large_string())
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if len(values) == 0:
        return np.empty(0, np.uint64)
    offsets = np.frombuffer(values.buffers()[1], np.int64, len(values) + 1, values.offset * 8)
    data = np.frombuffer(values.buffers()[2], np.uint8) if values.buffers()[2] is not None else np.empty(0, np.uint8)
    out = np.empty(len(values), np.uint64)
    first = 0
    while first < len(values):  # rows whose bytes fit CHUNK_BYTES (at least one row)
        last = int(np.searchsorted(offsets, offsets[first] + CHUNK_BYTES, side="right")) - 1
        last = min(max(last, first + 1), len(values))
        out[first:last] = _digest_rows(data, offsets[first:last + 1])
        first = last
    return out


def _digest_rows(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    start, end = int(offsets[0]), int(offsets[-1])
    lengths = np.diff(offsets)
    starts = offsets[:-1] - start
    position = np.arange(end - start, dtype=np.int64) - np.repeat(starts, lengths)
    weights = _WEIGHTS.upto(int(lengths.max()) + 1 if len(lengths) else 1)
    # byte + 1: a NUL byte still counts, so "a" and "a\0" differ; uint64 arithmetic wraps (mod 2**64)
    terms = (data[start:end].astype(np.uint64) + np.uint64(1)) * weights[position]
    sums = np.zeros(len(lengths), np.uint64)
    filled = lengths > 0
    if end > start:
        sums[filled] = np.add.reduceat(terms, starts[filled])
    return sums + lengths.astype(np.uint64) * weights[0]


@dataclass
class IdDigests:
    """The digests of every id of a manifest, filled batch by batch. Up to `budget` bytes (8 a
    row) they are one array in memory; beyond, they go to spill files on local scratch disk,
    one per range of their top bits, each later sorted alone: memory stays near `budget`
    whatever the row count (10^9 rows: 8 GB of digests on disk, a quarter GiB in memory)."""

    num_rows: int
    budget: int | None = None  # bytes of digests held in memory (None: MEMORY_BUDGET)
    digests: np.ndarray = field(init=False)
    filled: int = 0
    spill: _Spill | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        budget = MEMORY_BUDGET if self.budget is None else self.budget
        if self.num_rows * 8 <= budget:
            self.digests = np.empty(self.num_rows, np.uint64)
        else:
            self.digests = np.empty(max(1, budget // 8), np.uint64)  # a buffer, flushed to the spill files
            self.spill = _Spill(partitions_for(self.num_rows, budget))

    def add(self, ids: pa.Array | pa.ChunkedArray) -> None:
        d = id_digests(ids)
        while len(d):
            if self.filled == len(self.digests):
                self._flush()
            n = min(len(d), len(self.digests) - self.filled)
            self.digests[self.filled:self.filled + n] = d[:n]
            self.filled += n
            d = d[n:]

    def _flush(self) -> None:
        if self.spill is None:
            raise ValueError("more ids than the manifest's rows")
        self.spill.write(self.digests[:self.filled])
        self.filled = 0

    def candidates(self) -> np.ndarray:
        """Sorted digests held by more than one row (sorts the array in place; reads back and
        removes the spill files)."""
        if self.spill is None:
            return _repeated(self.digests[:self.filled])
        self._flush()
        return self.spill.repeated()


def partitions_for(rows: int, budget: int) -> int:
    """Spill files for `rows` digests: a power of two, each file about half of `budget`."""
    return 1 << max(1, math.ceil(math.log2(max(2, rows * 8 * 2 / max(budget, 8)))))


def _repeated(d: np.ndarray) -> np.ndarray:
    d.sort()
    return np.unique(d[1:][d[1:] == d[:-1]])


class _Spill:
    """Digests in spill files under this process's scratch folder, one per range of top bits."""

    def __init__(self, partitions: int) -> None:
        self.bits = partitions.bit_length() - 1
        self.folder = scratch.mkdtemp("ids-")
        self.paths = [os.path.join(self.folder, f"{k:05d}.u64") for k in range(partitions)]

    def write(self, d: np.ndarray) -> None:
        """Append each digest to its partition's file (by its top bits)."""
        d = np.sort(d)
        bounds = np.searchsorted(d >> np.uint64(64 - self.bits), np.arange(len(self.paths) + 1, dtype=np.uint64))
        for k, path in enumerate(self.paths):
            if bounds[k + 1] > bounds[k]:
                with open(path, "ab") as out:
                    d[bounds[k]:bounds[k + 1]].tofile(out)

    def repeated(self) -> np.ndarray:
        """The repeated digests of every partition (sorted: partitions go up by their top bits);
        the files are removed."""
        try:
            found = [_repeated(np.fromfile(p, np.uint64)) for p in self.paths if os.path.exists(p)]
        finally:
            scratch.release(self.folder)
        return np.concatenate(found) if found else np.empty(0, np.uint64)


@dataclass(frozen=True)
class Duplicate:
    id: str
    places: tuple[tuple[str, int], ...]  # (file name, row) of the first copies


def find_duplicates(candidates: np.ndarray, batches: Callable[[], Iterator[tuple[str, int, pa.Array]]],
                    wanted: int, places: int = 3) -> tuple[list[Duplicate], int]:
    """Ids that really repeat among the rows whose digest is a candidate: the first `wanted` of
    them (each with up to `places` places) and how many repeated ids there are in all.
    `batches()` yields (file name, first row, id array) over the manifest in order."""
    found: list[Duplicate] = []
    total = 0
    for lo in range(0, len(candidates), TRACKED):  # a bounded number of candidates per pass
        tracked = candidates[lo:lo + TRACKED]
        seen: dict[str, list[tuple[str, int]]] = {}
        counts: dict[str, int] = {}
        for name, offset, ids in batches():
            digests = id_digests(ids)
            index = np.clip(np.searchsorted(tracked, digests), 0, len(tracked) - 1)
            for r in np.flatnonzero(tracked[index] == digests):
                value = ids[int(r)].as_py()
                counts[value] = counts.get(value, 0) + 1
                where = seen.setdefault(value, [])
                if len(where) < places:
                    where.append((name, offset + int(r)))
        repeated = [v for v, n in counts.items() if n > 1]
        total += len(repeated)
        found += [Duplicate(v, tuple(seen[v])) for v in repeated[:max(0, wanted - len(found))]]
        if found and total > wanted:
            # the rest of the candidates only add to the count; they are repeats unless they collide
            total += len(candidates) - lo - len(tracked)
            break
    return found, total
