"""Run progress: a live line on a terminal, a steady progress line in logs."""

from __future__ import annotations

import sys
import time
from typing import Callable


class Progress:
    """Rows done / failed / left, images/s, ETA and active workers."""

    def __init__(self, rows_todo: int, workers: int, interval: float, echo: Callable[[str], None] = print) -> None:
        self.rows_todo = rows_todo
        self.workers = workers
        self.interval = interval
        self.echo = echo
        self.tty = sys.stdout.isatty()
        self.started = time.time()
        self.last_print = self.started
        self.done = 0
        self.failed = 0
        self.queued = 0
        self.in_flight = 0

    def shard_done(self, rows: int, errors: int) -> None:
        self.done += rows
        self.failed += errors

    def rate(self) -> float:
        """Rows per second since the run started dispatching."""
        return self.done / max(time.time() - self.started, 1e-9)

    def line(self) -> str:
        rate = self.rate()
        left = max(self.rows_todo - self.done, 0)
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        return (
            f"progress: {self.done}/{self.rows_todo} rows done, {self.failed} failed, {left} left | "
            f"{rate:.1f} img/s | ETA {eta} | {self.workers} workers, {self.in_flight} shards in flight"
        )

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
        self.echo(self.line())
