"""zimage-batch: batch inference of the Z-Image models on Ray; the Python API (`zimage_batch.api`).

`zimage_batch.run` is the API's `run()`; the stage package of the same name (`run/`: driver,
scheduler, workers) is imported by its full module names (`zimage_batch.run.driver`, ...). It
is loaded first, so that the function keeps the name however the package is imported later.
"""

import importlib

importlib.import_module("zimage_batch.run")

from zimage_batch.api import ManifestSummary, RunSummary, run, status, validate  # noqa: E402

__all__ = ["ManifestSummary", "RunSummary", "run", "status", "validate"]
