"""The `zimage-batch` command run inside the test process through click's CliRunner.

It skips an interpreter start and the package imports (~2 s a command). A `run` that reaches Ray
joins the cluster this process is connected to, if any (see `local_ray`), instead of starting
one. Use a subprocess where the process itself is under test: signals, exit on a kill, settings
read when a library is imported (HF_HUB_OFFLINE), a cluster the command starts for itself, or
environment its Ray workers must see that differs from the environment the cluster started in
(`env` here reaches the command, not the workers of an already-started cluster)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def cli_in_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The command's exit status, stdout and stderr, as `subprocess.run` would give them.

    stderr also holds what a real process would print there besides click's output: bytes
    written to file descriptor 2 (C libraries), warnings, log records of WARNING and above (the
    CLI's logging set-up is a no-op under pytest, whose handlers are already in place), and the
    traceback of an exception escaping the command."""
    from click.testing import CliRunner

    from zimage_batch.cli import main

    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))  # as cli.main sets up
    written: list[str] = []
    with _fd2_captured(written), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # once per place, as in a fresh process
        logging.getLogger().addHandler(handler)
        try:
            result = CliRunner().invoke(main, list(args), env=env)
        finally:
            logging.getLogger().removeHandler(handler)
    stderr = result.stderr + logs.getvalue()
    stderr += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    stderr += "".join(written)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["zimage-batch", *args], result.exit_code, result.stdout, stderr)


@contextmanager
def _fd2_captured(into: list[str]) -> Iterator[None]:
    """File descriptor 2 pointed at a temporary file for the block; what was written there is
    appended to `into`."""
    with tempfile.TemporaryFile() as file:
        saved = os.dup(2)
        os.dup2(file.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            file.seek(0)
            into.append(file.read().decode(errors="replace"))


@contextmanager
def ray_not_started() -> Iterator[None]:
    """A command refused before any work must not get as far as Ray: inside this block, joining
    or starting a cluster fails the command with an error line that names this check."""
    from zimage_batch.run.cluster import RayCluster

    def refuse(self: RayCluster) -> None:
        raise AssertionError("a refused command got as far as starting Ray")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RayCluster, "connect", refuse)
        yield


@contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[None]:
    """A fresh local Ray cluster for this process (address="local": never one that `ray start`
    left on the machine), shut down after. Its workers inherit this process's environment as it
    is now: export S3 settings before. Workers' own output stays in Ray's logs (it would land in
    whichever command's stderr is being captured when Ray prints it)."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
