"""What a worker says when the driver asks whether it is still making progress.

`ProgressCounter` lives on the worker (ticked by every batch and each step of a shard);
`Heartbeat` is its answer, read by the scheduler's stall check. Neither imports the model
stack, so an actor answers from the moment it exists, while its model is still loading.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Heartbeat:
    """A worker's answer to "still there?". `progress` moves whenever it finishes a batch (and
    when a shard starts or ends, or its model is loaded); `loading`: its model is still loading
    (a download may take long: a worker that answers while loading is making progress);
    `slowest_batch_s`: its slowest batch so far; `shard`: the shard of its latest batch."""

    worker: str  # host:pid
    progress: int
    loading: bool = False
    slowest_batch_s: float = 0.0
    shard: str | None = None


class ProgressCounter:
    """A worker's progress, as its heartbeat reports it: a count that moves with every finished
    batch (and each step of a shard around them), the slowest batch, the latest batch's shard."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.slowest_batch_s = 0.0
        self.shard: str | None = None

    def tick(self, shard: str | None = None, batch_s: float | None = None) -> None:
        with self._lock:
            self.count += 1
            self.shard = shard or self.shard
            if batch_s is not None:
                self.slowest_batch_s = max(self.slowest_batch_s, batch_s)

    def heartbeat(self, worker: str, loading: bool = False) -> Heartbeat:
        with self._lock:
            return Heartbeat(worker, self.count, loading, self.slowest_batch_s, self.shard)
