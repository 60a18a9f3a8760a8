"""`zimage-batch submit`: run a job file on a remote Ray cluster through the Ray Jobs API.

The job file (with local relative paths made absolute) travels in the job's runtime
environment as its working directory; the entrypoint is the same `zimage-batch run` joining
the cluster it runs on. The cluster's image must have zimage-batch installed (see cluster/).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable

import yaml

from zimage_batch.jobspec import JobError, _resolve_relative_paths, load_job
from zimage_batch.run.cluster import auth_hint, forwarded_env, is_auth_error

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def submit_job(
    job_file: str,
    address: str,
    settings: list[str],
    wait: bool = True,
    pip: list[str] | None = None,
    echo: Callable[[str], None] = print,
) -> int:
    """Submit; with `wait`, stream the job's logs and return 0 when it succeeded."""
    from ray.job_submission import JobSubmissionClient

    job = load_job(job_file, {}, settings)  # refuse a bad job file before it reaches the cluster
    with open(job_file, encoding="utf-8") as f:
        values: dict[str, Any] = yaml.safe_load(f) or {}
    _resolve_relative_paths(values, os.path.dirname(os.path.abspath(job_file)))
    values.pop("address", None)
    with tempfile.TemporaryDirectory(prefix="zimage-batch-submit-") as workdir:
        with open(os.path.join(workdir, "job.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(values, f, allow_unicode=True)
        runtime_env: dict[str, Any] = dict(job.runtime_env or {})
        runtime_env["working_dir"] = workdir
        runtime_env["env_vars"] = {**forwarded_env(), **runtime_env.get("env_vars", {})}  # the run's policy
        if pip:
            runtime_env["pip"] = list(pip)
        entrypoint = " ".join(["zimage-batch", "run", "job.yaml", "--address", "auto", *_quoted_settings(settings)])
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", os.path.basename(job_file).rsplit(".", 1)[0])
        try:
            client = JobSubmissionClient(address)
            submission_id = _submit_when_ready(
                client,
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=f"zimage-batch-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            )
        except Exception as exc:
            if is_auth_error(exc):  # Ray's AuthenticationError: one line that says what to set
                raise JobError(auth_hint(address)) from None
            raise
    echo(f"submitted {submission_id} to {address}")
    if not wait:
        return 0
    return _follow(client, submission_id, echo)


def _submit_when_ready(client: JobSubmissionClient, timeout: float = 120.0, **kwargs: Any) -> str:
    """Submit; a head that has just started answers "No available agent" for a while: wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def _quoted_settings(settings: list[str]) -> list[str]:
    import shlex

    return [part for s in settings for part in ("--set", shlex.quote(s))]


def _follow(client: JobSubmissionClient, submission_id: str, echo: Callable[[str], None], poll: float = 1.0) -> int:
    printed = 0
    while True:
        status = str(client.get_job_status(submission_id)).split(".")[-1]
        logs = client.get_job_logs(submission_id)
        for line in logs[printed:].splitlines():
            echo(line)
        printed = len(logs)
        if status in TERMINAL:
            echo(f"job {submission_id}: {status}")
            return 0 if status == "SUCCEEDED" else 1
        time.sleep(poll)
