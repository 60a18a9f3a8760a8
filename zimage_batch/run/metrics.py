"""Job metrics through Ray's metrics API (`ray.util.metrics`), shown on the Ray dashboard.

    zimage_rows_done{worker}              rows generated and stored (counter)
    zimage_rows_failed{worker}            rows stored as `error` (counter)
    zimage_images_per_second{worker}      throughput of the latest batch (gauge)
    zimage_batch_latency_seconds{worker}  wall time of one generated batch (histogram)
    zimage_queue_depth                    shards waiting in the driver (gauge)
    zimage_shards_in_flight               shards handed to workers, not yet back (gauge)

Prometheus sees them with Ray's `ray_` prefix (counters also with a `_total` suffix), e.g.
`ray_zimage_rows_done_total`.

Every call is safe without Ray (ShardRunner also runs outside it) and never raises: metrics
must not fail a job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

LATENCY_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160]

_lock = threading.Lock()
_metrics: dict[str, Any] | None = None


def _get() -> dict[str, Any] | None:
    """The metric objects, made once per process; None when Ray's metrics are unavailable."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                try:
                    from ray.util.metrics import Counter, Gauge, Histogram

                    worker = ("worker",)
                    _metrics = {
                        "done": Counter("zimage_rows_done", "Rows generated and stored", tag_keys=worker),
                        "failed": Counter("zimage_rows_failed", "Rows stored as error", tag_keys=worker),
                        "rate": Gauge("zimage_images_per_second", "Images per second of the latest batch", tag_keys=worker),
                        "latency": Histogram(
                            "zimage_batch_latency_seconds", "Wall time of one generated batch",
                            boundaries=LATENCY_BOUNDARIES, tag_keys=worker,
                        ),
                        "queue": Gauge("zimage_queue_depth", "Shards waiting in the driver"),
                        "in_flight": Gauge("zimage_shards_in_flight", "Shards handed to workers, not yet back"),
                    }
                except Exception as exc:  # noqa: BLE001 - no Ray, or an incompatible one
                    log.debug("metrics disabled: %s", exc)
                    _metrics = {}
    return _metrics or None


def _record(fn: Callable[[Any], None]) -> None:
    metrics = _get()
    if metrics is None:
        return
    try:
        fn(metrics)
    except Exception as exc:  # noqa: BLE001 - never fail a job over a metric
        log.debug("metric not recorded: %s", exc)


def batch_done(worker: str, images: int, seconds: float) -> None:
    """One generated batch of `images` rows that took `seconds`."""
    tags = {"worker": worker}

    def record(m: dict[str, Any]) -> None:
        m["latency"].observe(seconds, tags=tags)
        if seconds > 0:
            m["rate"].set(images / seconds, tags=tags)

    _record(record)


def rows_done(worker: str, ok: int, failed: int) -> None:
    """A stored shard: `ok` rows with an image, `failed` rows stored as errors."""
    tags = {"worker": worker}

    def record(m: dict[str, Any]) -> None:
        if ok:
            m["done"].inc(ok, tags=tags)
        if failed:
            m["failed"].inc(failed, tags=tags)

    _record(record)


def queue_depth(queued: int, in_flight: int) -> None:
    """The driver's queue: shards waiting and shards out on workers."""

    def record(m: dict[str, Any]) -> None:
        m["queue"].set(queued)
        m["in_flight"].set(in_flight)

    _record(record)
