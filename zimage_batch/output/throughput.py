"""One throughput figure, one meaning: what a run's last line, `status` and the report show.

A run's throughput is counted from the commit markers of the shards it committed (those that
started after the run did) and stated twice, each labelled:

* **over the run's wall time**: images / seconds since the run started (validation, model
  loading and start-up included; for a running job, until now). What a user waits for.
* **over generation time**: images / seconds the devices spent generating them (the shards'
  ``busy_s``, summed over workers): what one device does while it generates.

The driver, `status` and the report all call :func:`run_throughput` on the same markers and the
same wall time (the run record's ``elapsed_s`` once it ended), so the three agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zimage_batch.output.ledger import CommitMarker


@dataclass(frozen=True)
class Throughput:
    images: int  # images the run stored (ok)
    rows: int  # manifest rows the run committed (ok or error)
    wall_s: float  # the run's wall time
    generation_s: float  # device time spent generating, summed over workers

    @property
    def per_s_wall(self) -> float:
        """Images per second over the run's wall time."""
        return self.images / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def per_s_generation(self) -> float:
        """Images per second over generation time (per device)."""
        return self.images / self.generation_s if self.generation_s > 0 else 0.0

    def text(self) -> str:
        """The one sentence every surface prints."""
        if not self.rows:
            return f"no shards committed by this run ({self.wall_s:.1f} s wall time)"
        return (f"{self.per_s_wall:.2f} img/s over the run's wall time ({self.images} images in {self.wall_s:.1f} s); "
                f"{self.per_s_generation:.2f} img/s over generation time ({self.generation_s:.1f} s of device time)")

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "rows": self.rows, "wall_s": self.wall_s, "generation_s": self.generation_s,
                "images_per_s_wall": self.per_s_wall, "images_per_s_generation": self.per_s_generation}


def markers_of_run(markers: list[CommitMarker], started: float, run: str | None = None) -> list[CommitMarker]:
    """The markers of shards the run `run` (which started at `started`) committed. Markers name
    their run; those of versions that did not are told by their start time."""
    return [m for m in markers if (m.run == run if m.run and run else m.started >= started)]


def images_of(marker: CommitMarker) -> int:
    """Images a committed shard stored."""
    return marker.ok


def run_throughput(markers: list[CommitMarker], started: float, wall_s: float, run: str | None = None) -> Throughput:
    """The throughput of the run `run` that started at `started` and has run for `wall_s` seconds."""
    mine = markers_of_run(markers, started, run)
    return Throughput(
        images=sum(images_of(m) for m in mine),
        rows=sum(m.rows for m in mine),
        wall_s=max(0.0, wall_s),
        generation_s=sum(m.busy_s for m in mine),
    )
