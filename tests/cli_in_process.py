"""The `zimage-batch` command run inside the test process through click's CliRunner.

It skips an interpreter start and the package imports (~2 s a command). A `run` that reaches Ray
joins the cluster this process is connected to, if any (see `local_ray`), instead of starting
one. Use a subprocess where the process itself is under test: signals, exit on a kill, settings
read when a library is imported (HF_HUB_OFFLINE), a cluster the command starts for itself."""

from __future__ import annotations

import subprocess
import traceback
from collections.abc import Iterator
from contextlib import contextmanager


def cli_in_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The command's exit status, stdout and stderr, as `subprocess.run` would give them; an
    exception escaping the command is written to stderr as the real command would print it."""
    from click.testing import CliRunner

    from zimage_batch.cli import main

    result = CliRunner().invoke(main, list(args), env=env)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["zimage-batch", *args], result.exit_code, result.stdout, stderr)


@contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[None]:
    """A fresh local Ray cluster for this process (address="local": never one that `ray start`
    left on the machine), shut down after. Its workers inherit this process's environment as it
    is now: export S3 settings before."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()
