"""The end of a job: its last shards cut into smaller ones, so that the workers finish together.

At a thousand workers a job ends when its slowest last shard does; with 1,000-row shards at
0.9 s/img that is 15 minutes of 999 GPUs waiting on one. So, as guided self-scheduling does,
the rows left at each point of the queue set the size of the piece cut there: a piece with R
rows from its start to the end of the queue holds about R / (TAIL_ROUNDS x workers) rows, at
least TAIL_MIN_ROWS (a shard's last piece takes what is left of it). Only the last TAIL_ROUNDS x workers shards' worth of
rows change: the bulk of the job keeps its shard size.

Cutting is safe for exactly-once because it happens to shards no attempt has run (the plan's,
before the scheduler takes them): each piece is a row range of its shard, named `<filetag>-<start>`
by its own start row like any shard, the pieces tile their shard without overlap, and a later
run plans its gaps around whatever pieces were committed, as after a changed shard size.
Shards of mixed-variant manifests (which hold only one variant's rows of their range) are kept
whole.
"""

from __future__ import annotations

import math
from typing import Sequence

from zimage_batch.run.plan import Shard, shard_name

TAIL_ROUNDS = 3  # the tail: the last TAIL_ROUNDS x workers shards' rows (fleet.py default: 2 gave 1.083x, 3 and 4 1.066x)
TAIL_MIN_ROWS = 64  # a piece's rows at least: its fixed costs (prompts, commit, publish) stay small


def piece_rows(rows_left: int, workers: int, shard_rows: int, min_rows: int = TAIL_MIN_ROWS) -> int:
    """Rows of the shard cut where `rows_left` rows remain to the end of the queue."""
    return max(min_rows, min(shard_rows, math.ceil(rows_left / (TAIL_ROUNDS * workers))))


def cut_tail(shards: Sequence[Shard], workers: int, min_rows: int = TAIL_MIN_ROWS) -> list[Shard]:
    """`shards` (in the order they will run) with the tail's cut into pieces; unchanged with
    fewer than two workers or when no shard is larger than its piece would be."""
    if workers < 2 or not shards:
        return list(shards)
    shard_rows = max(s.num_rows for s in shards)
    left = sum(s.num_rows for s in shards)
    out: list[Shard] = []
    for shard in shards:
        if shard.rows is not None or shard.variant is not None:  # a mixed-variant shard: kept whole
            out.append(shard)
            left -= shard.num_rows
            continue
        start = shard.start
        while start < shard.end:
            size = piece_rows(left, workers, shard_rows, min_rows)
            end = shard.end if shard.end - (start + size) < min_rows else start + size  # no crumb after it
            out.append(Shard(shard.name if start == shard.start else shard_name(shard.file, start),
                             shard.file, start, end))
            left -= end - start
            start = end
    return out
