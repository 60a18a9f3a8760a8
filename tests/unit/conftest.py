"""Unit tests: no Ray, no `zimage-batch` in a subprocess. Anything here that tries either, in a test
or in a fixture of any scope, fails loudly (its place is tests/drills/), so that
`python -m pytest tests/unit` stays a quick run of its own."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import pytest
import ray

#: Words of a command line that runs the CLI or starts a Ray node.
_DRILL_COMMANDS = ("zimage-batch", "zimage_batch.cli", "zimage_batch/cli", "ray.scripts", "ray start")

_HERE = Path(__file__).resolve().parent
_running_unit_test = False  # set while a test of this folder runs: its setup (fixtures), call and teardown


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """pytest calls this hook for every test of the session, not only this folder's: check the path."""
    global _running_unit_test
    _running_unit_test = _HERE in item.path.resolve().parents
    try:
        yield
    finally:
        _running_unit_test = False


def _refuse_ray(init):
    @functools.wraps(init)
    def refusing(*args, **kwargs):
        if _running_unit_test:
            raise AssertionError("a unit test started Ray: move it to tests/drills/")
        return init(*args, **kwargs)

    refusing._zb_refuses = True
    return refusing


def _refuse_drill_commands(popen_init):
    @functools.wraps(popen_init)
    def refusing(self, args, *rest, **kwargs):
        line = args if isinstance(args, (str, bytes)) else " ".join(map(str, args))
        if _running_unit_test and any(word in str(line) for word in _DRILL_COMMANDS):
            raise AssertionError(f"a unit test ran {line!r} in a subprocess: move it to tests/drills/")
        popen_init(self, args, *rest, **kwargs)

    refusing._zb_refuses = True
    return refusing


# Installed for the whole process (a module-scoped fixture such as `ray_local` runs before any
# function-scoped patch); they refuse only while a test of this folder runs.
if not getattr(ray.init, "_zb_refuses", False):
    ray.init = _refuse_ray(ray.init)
if not getattr(subprocess.Popen.__init__, "_zb_refuses", False):
    subprocess.Popen.__init__ = _refuse_drill_commands(subprocess.Popen.__init__)
