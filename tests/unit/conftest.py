"""Unit tests: no Ray, no `zimage-batch` in a subprocess. Anything here that tries either fails loudly
(its place is tests/drills/), so `python -m pytest tests/unit` stays a quick run of its own."""

from __future__ import annotations

import subprocess

import pytest

#: Words of a command line that runs the CLI or starts a Ray node.
_DRILL_COMMANDS = ("zimage-batch", "zimage_batch.cli", "zimage_batch/cli", "ray.scripts", "ray start")


def _refuse_ray(*args: object, **kwargs: object) -> None:
    raise AssertionError("a unit test started Ray: move it to tests/drills/")


@pytest.fixture(autouse=True)
def no_ray_no_cli(monkeypatch):
    """`ray.init` raises, and so does starting the CLI or a Ray node in a subprocess."""
    import ray

    monkeypatch.setattr(ray, "init", _refuse_ray)
    real_init = subprocess.Popen.__init__

    def popen(self, args, *rest, **kwargs):
        line = args if isinstance(args, str) else " ".join(map(str, args))
        if any(word in line for word in _DRILL_COMMANDS):
            raise AssertionError(f"a unit test ran {line!r} in a subprocess: move it to tests/drills/")
        real_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    yield
