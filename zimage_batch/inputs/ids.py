"""The duplicate-id check at 10^8 rows: 8 bytes an id, not the ids themselves.

Keeping every id (Arrow strings plus a hash table) took 1.37 GiB of driver memory at 10^7 rows,
so 10^8 rows would not fit a 4 GiB driver. Instead:

1. while validation streams the manifest, each id is reduced to a 64-bit digest (a linear hash
   of its UTF-8 bytes with random 64-bit weights per position, computed with numpy over Arrow's
   buffers) into one preallocated array: 8 bytes a row, 0.8 GB at 10^8;
2. the array is sorted in place; equal neighbours are the candidate duplicates;
3. only if there are any, a second pass reads the id column again and compares the ids whose
   digest is a candidate exactly, so a digest collision (about one pair in 10^4 manifests of
   10^8 rows) never refuses a good manifest, and real duplicates are named with file and row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

CHUNK_BYTES = 1 << 22  # id bytes hashed at a time (bounds the temporary arrays to a few tens of MB)
TRACKED = 100_000  # candidate digests compared exactly per pass over the ids
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
    """The digests of every id of a manifest, filled batch by batch, in manifest order."""

    num_rows: int
    digests: np.ndarray = field(init=False)
    filled: int = 0

    def __post_init__(self) -> None:
        self.digests = np.empty(self.num_rows, np.uint64)

    def add(self, ids: pa.Array | pa.ChunkedArray) -> None:
        d = id_digests(ids)
        self.digests[self.filled:self.filled + len(d)] = d
        self.filled += len(d)

    def candidates(self) -> np.ndarray:
        """Sorted digests held by more than one row (sorts the array in place)."""
        d = self.digests[:self.filled]
        d.sort()
        repeated = d[1:][d[1:] == d[:-1]]
        return np.unique(repeated)


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
