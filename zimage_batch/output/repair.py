"""`zimage-batch repair OUTPUT`: remove the later of overlapping committed shards.

Overlaps come from versions that let two runs write OUTPUT at once, or from a run that lost its
lease; `run`, `status` and `report` name them and refuse to call OUTPUT done. Repair holds the
lease (no run writes meanwhile), keeps the shard readers saw first of each overlapping pair,
and takes the other out whole: metadata, images, then its marker. Rows that only the removed
shard held are generated again by the next run.
"""

from __future__ import annotations

from typing import Callable

from zimage_batch.output.lease import Lease, new_run_id
from zimage_batch.output.ledger import Ledger
from zimage_batch.output.overlaps import Overlap, find_overlaps
from zimage_batch.storage import Storage


class NothingToRepair(RuntimeError):
    """OUTPUT holds no job."""


def repair(storage: Storage, echo: Callable[[str], None] = print, wait: bool = False) -> list[Overlap]:
    """Remove the extra shard of every overlap in OUTPUT (a line each); returns the overlaps."""
    ledger = Ledger(storage)
    if ledger.read_job() is None:
        raise NothingToRepair(f"{storage.uri} holds no job (no job.json)")
    lease = Lease(storage, new_run_id(), echo=echo)
    lease.acquire(wait=wait)
    try:
        overlaps = find_overlaps(ledger.committed().values(), ledger.published_shards())
        for overlap in overlaps:
            extra = overlap.extra
            ledger.remove_shard(extra)
            echo(f"removed {overlap.describe()}: {extra.images or extra.rows} images by run {extra.run or '(unknown)'}")
        return overlaps
    finally:
        lease.release()
