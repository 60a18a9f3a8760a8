"""What a run did, as `run_job` returns it: rows and shards, throughput, workers, and what the
end of the run wrote (`Finish`: the dataset card and the report, or why not)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zimage_batch.output.throughput import Throughput


@dataclass(frozen=True)
class Finish:
    """What the end of a run wrote beside its record: where OUTPUT's dataset card and report
    are, or why one could not be written (the rows stay committed: reported, not fatal).
    Neither location nor error: not asked for (`report: false`)."""

    card: str | None = None
    report: str | None = None
    card_error: str | None = None
    report_error: str | None = None

    def lines(self) -> list[tuple[str, bool]]:
        """What to tell the user, card first: (line, whether it is a warning)."""
        out = []
        for what, location, error in (("dataset card", self.card, self.card_error),
                                      ("report", self.report, self.report_error)):
            if location:
                out.append((f"{what}: {location}", False))
            elif error:
                out.append((f"could not write the {what}: {error}", True))
        return out


@dataclass
class RunSummary:
    """What a run did: rows and shards committed, shards given up, throughput, workers."""

    output: str
    rows_total: int
    rows_ok: int = 0  # metadata rows (images) stored ok, in every committed shard
    rows_error: int = 0  # metadata rows (images) that failed
    rows_filtered: int = 0  # metadata rows (images) a curated job's keep rule turned down: done, no image
    rows_done: int | None = None  # manifest rows of the committed shards (None: rows_ok + rows_error)
    shards_committed: int = 0
    shards_skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # shard -> last error
    started: float = 0.0
    elapsed_s: float = 0.0
    throughput: Throughput | None = None  # of this run: images/s over wall time and over generation time
    device: str | None = None  # GPU or CPU, once workers ran
    workers: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False
    run: str = ""  # the run's id (its lease token, in the markers it commits)
    lost_lease: str | None = None  # why the run stopped: another run took OUTPUT's lease over
    overlaps: str | None = None  # the line naming overlapping committed shards, if OUTPUT has any
    finish: Finish | None = None  # what the end of the run wrote (the card, the report); not in the run record

    @property
    def rows_left(self) -> int:
        """Rows of the manifest committed neither as ok nor as error."""
        done = self.rows_ok + self.rows_error if self.rows_done is None else self.rows_done
        return max(self.rows_total - done, 0)

    @property
    def exit_code(self) -> int:
        """0 only when every row is committed once; 130 when stopped by a signal; else 1."""
        if self.lost_lease or self.overlaps:
            return 1
        if self.stopped:
            return 130
        return 1 if self.failed or self.rows_left else 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def problem(self) -> str | None:
        """Why the run is not complete, in one line; None when it is."""
        if self.lost_lease:
            return f"{self.lost_lease}; this run stopped, {self.rows_left} rows left"
        if self.overlaps:
            return self.overlaps
        if self.stopped:
            return f"stopped before the end with {self.rows_left} rows left; run again to resume"
        if self.failed:
            return f"{len(self.failed)} shard(s) failed, {self.rows_left} rows left; rerun to retry them"
        if self.rows_left:
            return (f"{self.rows_left} of {self.rows_total} rows are neither committed nor failed; "
                    "run again to finish them")
        return None
