"""zimage-batch: batch inference of the Z-Image models on Ray.

The Python API is `zimage_batch.api` (`api.run`, `api.validate`, `api.status`); `validate`,
`status` and the summaries are also importable from here. `run` is not: `zimage_batch.run` is
the run stage package (driver, scheduler, workers), and a function of that name would hide it
(`import zimage_batch.run.driver as driver` would then fail).
"""

from typing import Any

__all__ = ["ManifestSummary", "RunSummary", "api", "status", "validate"]


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use (importing the package stays cheap)."""
    if name in __all__:
        import importlib

        api = importlib.import_module("zimage_batch.api")
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module 'zimage_batch' has no attribute {name!r}")
