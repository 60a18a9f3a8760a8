"""Background thread pools: everything a worker does beside the model yields the CPU to it."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

BACKGROUND_NICE = 10  # added to a background thread's nice value (Linux: per thread)


def background_pool(max_workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool for encoding, uploads and source fetches, whose threads run at a lower
    priority than the model's (and its intra-op threads'), so that on a busy CPU they wait
    for the model rather than the model for them."""
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name, initializer=_lower_priority)


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at normal priority
        pass
