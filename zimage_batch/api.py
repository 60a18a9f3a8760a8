"""The Python API: the command line's jobs for notebooks and Ray job scripts.

    from zimage_batch import api

    summary = api.run("job.yaml", workers=2)                     # a job file, then settings
    summary = api.run(manifest="prompts.parquet", output="out", model="tiny:turbo")
    if not summary.ok:
        print(summary.problem)                                   # the CLI's one error line
    api.status("out")["rows_left"]

Same semantics as `zimage-batch run|validate|status`: settings resolve as the job file, then
flags and `--set` do; bad input raises before anything is written (`JobError`,
`ManifestError`, `ModelSourceError`, `StorageError`, `JobMismatch`); `summary.exit_code` is
the exit status the CLI would give (0 only when every row is committed).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from zimage_batch.jobspec import load_job
from zimage_batch.run.driver import run_job
from zimage_batch.run.preflight import check_manifest
from zimage_batch.run.summary import RunSummary

__all__ = ["ManifestSummary", "RunSummary", "run", "status", "validate"]

log = logging.getLogger(__name__)


def run(job_file: str | os.PathLike | None = None, *, echo: Callable[[str], None] | None = print,
        **settings: Any) -> RunSummary:
    """Run a job: `job_file` (YAML), then `settings` (any job setting: manifest=, output=,
    model=, workers=, width=, models={"base": ...}, ...), like `zimage-batch run JOB --set`.

    `echo` gets the progress lines (None: silent). Like the CLI, writes the dataset card
    (OUTPUT/README.md, what `datasets.load_dataset(OUTPUT)` reads) and OUTPUT/report.html unless
    report=False; one that cannot be written is logged as a warning. Returns the summary: `ok`,
    `exit_code`, `problem`, `rows_ok`, `rows_left`, `finish` (where the card and report are), ...
    """
    job = load_job(os.fspath(job_file) if job_file is not None else None, settings, [])
    say = echo or (lambda line: None)
    summary = run_job(job, echo=say)
    for line, warning in summary.finish.lines() if summary.finish else []:
        if warning:
            log.warning("%s", line)
        else:
            say(line)
    return summary


@dataclass(frozen=True)
class ManifestSummary:
    """A manifest that passed validation."""

    rows: int
    files: int
    kind: str  # prompt | edit
    variants: tuple[str, ...]  # the variants its rows run on
    warnings: tuple[str, ...] = ()  # e.g. columns that look like a misspelled known one


def validate(manifest: str | os.PathLike, **settings: Any) -> ManifestSummary:
    """Check `manifest` (schema and every value) against the job `settings` (model=, variant=,
    width=, ...) without a model or a GPU, like `zimage-batch validate`; raises ManifestError."""
    values = {"output": "-", **settings, "manifest": os.fspath(manifest)}
    warnings: list[str] = []
    loaded, resolved = check_manifest(load_job(None, values, []), warn=warnings.append)
    return ManifestSummary(loaded.num_rows, len(loaded.files), loaded.kind, tuple(sorted(resolved.defaults)),
                           tuple(warnings))


def status(output: str | os.PathLike) -> dict[str, Any]:
    """The figures of `zimage-batch status OUTPUT --json`: state, rows done / failed / left, ...
    Reads OUTPUT only; raises NoJob when it holds no job."""
    from zimage_batch.output.status import status as output_status

    return output_status(os.fspath(output))
