"""Run progress: a live line on a terminal, a steady progress line in logs."""

from __future__ import annotations

import sys
import time
from typing import Callable

from zimage_batch.text import plural


class Progress:
    """Rows done / failed / left, images/s over the run's wall time so far, ETA and active workers."""

    def __init__(self, rows_todo: int, workers: int, interval: float, echo: Callable[[str], None] = print,
                 started: float | None = None) -> None:
        self.rows_todo = rows_todo
        self.workers = workers
        self.interval = interval
        self.echo = echo
        self.tty = sys.stdout.isatty()
        self.started = time.time() if started is None else started  # the run's start: same clock as its last line
        self.last_print = time.time()
        self.done = 0
        self.failed = 0
        self.images = 0
        self.queued = 0
        self.in_flight = 0

    def shard_done(self, rows: int, errors: int, images: int | None = None) -> None:
        self.done += rows
        self.failed += errors
        self.images += rows - errors if images is None else images

    def rate(self) -> float:
        """Images per second over the run's wall time so far."""
        return self.images / max(time.time() - self.started, 1e-9)

    def line(self, final: bool = False) -> str:
        left = max(self.rows_todo - self.done, 0)
        counts = f"progress: {self.done}/{self.rows_todo} rows done, {self.failed} failed, {left} left"
        if final:  # the run's throughput follows on its own line, measured once
            return counts
        rows_per_s = self.done / max(time.time() - self.started, 1e-9)
        eta = f"{left / rows_per_s:.0f}s" if rows_per_s > 0 else "?"
        return (f"{counts} | {self.rate():.1f} img/s over wall time so far | ETA {eta} | "
                f"{plural(self.workers, 'worker')}, {plural(self.in_flight, 'shard')} in flight")

    def tick(self, queued: int, in_flight: int, workers: int) -> None:
        self.queued, self.in_flight, self.workers = queued, in_flight, workers
        now = time.time()
        if self.tty:
            sys.stdout.write("\r" + self.line() + "\x1b[K")
            sys.stdout.flush()
        elif now - self.last_print >= self.interval:
            self.echo(self.line())
            self.last_print = now

    def finish(self) -> None:
        if self.tty:
            sys.stdout.write("\n")
        self.echo(self.line(final=True))
