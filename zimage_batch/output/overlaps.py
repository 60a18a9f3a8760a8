"""Committed shards whose rows overlap: found, named, and which one of each pair goes.

One run never cuts overlapping shards, and the lease keeps two runs from writing OUTPUT at
once; overlaps come from versions without the lease (two runs with different `--shard-size`)
or from a run that lost its lease and committed before it noticed. A reader would see their
common rows twice, so `run`, `status` and `report` name them and `repair` removes the extras.

Which shard stays: a published one before one that is not (readers may have seen it), then
the one committed first. The others overlapping a kept shard are the extras.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Iterable

from zimage_batch.output.ledger import CommitMarker, Ledger


@dataclass(frozen=True)
class Overlap:
    """`extra` shares rows with `kept`, which stays."""

    kept: CommitMarker
    extra: CommitMarker

    def describe(self) -> str:
        k, e = self.kept, self.extra
        return (f"shard {e.shard} (rows {e.start}..{e.end - 1}) overlaps shard {k.shard} "
                f"(rows {k.start}..{k.end - 1}) of {e.file}")


class _KeptRanges:
    """Kept shards of one manifest file, by variant (None: every variant), each as sorted
    disjoint row ranges: whether a range crosses a kept one is one bisection per variant."""

    def __init__(self) -> None:
        self.starts: dict[str | None, list[int]] = {}
        self.markers: dict[str | None, list[CommitMarker]] = {}

    def clash(self, marker: CommitMarker) -> CommitMarker | None:
        variants = list(self.starts) if marker.variant is None else [marker.variant, None]
        for variant in variants:
            starts = self.starts.get(variant, [])
            i = bisect.bisect_left(starts, marker.end) - 1  # the last kept range starting before our end
            if i >= 0 and self.markers[variant][i].end > marker.start:
                return self.markers[variant][i]
        return None

    def add(self, marker: CommitMarker) -> None:
        starts = self.starts.setdefault(marker.variant, [])
        i = bisect.bisect_left(starts, marker.start)
        starts.insert(i, marker.start)
        self.markers.setdefault(marker.variant, []).insert(i, marker)


def find_overlaps(markers: Iterable[CommitMarker], published: set[str] | None = None) -> list[Overlap]:
    """The extra shards among `markers`, each with a kept shard it overlaps. The kept shards
    share no row. `published`: shards a reader can see (kept first); None: all of them."""
    def priority(m: CommitMarker) -> tuple:
        return (published is not None and m.shard not in published, m.finished, m.shard)

    kept_by_file: dict[str, _KeptRanges] = {}
    overlaps: list[Overlap] = []
    for marker in sorted(markers, key=priority):
        kept = kept_by_file.setdefault(marker.file, _KeptRanges())
        clash = kept.clash(marker)
        if clash is None:
            kept.add(marker)
        else:
            overlaps.append(Overlap(clash, marker))
    return overlaps


def without_extras(markers: Iterable[CommitMarker], overlaps: list[Overlap]) -> list[CommitMarker]:
    """`markers` less the extras of `overlaps`: each row counted once."""
    extras = {o.extra.shard for o in overlaps}
    return [m for m in markers if m.shard not in extras]


def overlap_line(uri: str, overlaps: list[Overlap]) -> str:
    """The one line that names the overlaps of OUTPUT and what to do."""
    more = f" (and {len(overlaps) - 1} more)" if len(overlaps) > 1 else ""
    return (f"{uri} holds overlapping committed shards, so some rows are there twice: {overlaps[0].describe()}{more}; "
            f"run `zimage-batch repair {uri}` to remove the later ones")


class OverlappingShards(RuntimeError):
    """OUTPUT holds published shards that overlap: `zimage-batch repair` removes the extras."""


def settle_overlaps(ledger: Ledger, committed: dict[str, CommitMarker],
                    echo: Callable[[str], None]) -> tuple[dict[str, CommitMarker], list[Overlap]]:
    """Remove the overlapping shards no reader has seen (committed, never published: a run that
    lost its lease committed them before it noticed); returns the markers left and the
    overlaps among published shards, which only `repair` removes. Call it holding the lease."""
    published = ledger.published_shards()
    overlaps = find_overlaps(committed.values(), published)
    left = dict(committed)
    for overlap in overlaps:
        extra = overlap.extra
        if extra.shard in published:
            continue
        ledger.remove_shard(extra)
        del left[extra.shard]
        echo(f"removed shard {extra.shard} (rows {extra.start}..{extra.end - 1}), committed by run "
             f"{extra.run or '(unknown)'} but never published: it overlapped shard {overlap.kept.shard}")
    return left, [o for o in overlaps if o.extra.shard in published]
