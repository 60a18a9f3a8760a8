"""The end of a run, whoever started it: its record (`_runs/<time>-<pid>.json`), OUTPUT's dataset
card (`README.md`, what `datasets.load_dataset(OUTPUT)` reads) and its report (`report.html`,
unless `report: false`).

`run_job` calls it last, so the CLI's `run`, `api.run` and `submit` (a Ray job that runs the CLI
on the cluster) leave the same OUTPUT. The commit markers are the ones the run read once at its
end (after every worker pool was shut down, overlaps settled): card and report are rendered from
them, not from a listing of `_commits/` each.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable

from zimage_batch.output import layout
from zimage_batch.output.ledger import CommitMarker
from zimage_batch.output.status import OutputState, load_output
from zimage_batch.run.estimate import run_key
from zimage_batch.run.preflight import ResolvedJob
from zimage_batch.run.summary import Finish, RunSummary
from zimage_batch.storage import Storage
from zimage_batch.text import first_line


def finish_run(storage: Storage, job: ResolvedJob, summary: RunSummary, markers: Iterable[CommitMarker]) -> Finish:
    """Write the run record, then the dataset card and the report from one reading of OUTPUT
    (`markers`: every commit marker, as the run's end read them); returns what was written.
    A card or report that cannot be written is named in the result, not raised: the job is done.
    A run that lost OUTPUT's lease writes only its record: card and report belong to the holder."""
    from zimage_batch.output.dataset_card import write_dataset_card  # yaml and the HTML: only once a run ends
    from zimage_batch.output.report import write_report

    write_run_record(storage, job, summary)
    if summary.lost_lease:
        return Finish()
    try:
        state: OutputState | None = load_output(storage, committed=markers)
        unreadable = None
    except Exception as exc:  # noqa: BLE001 - the job itself is done
        state, unreadable = None, first_line(exc)
    card, card_error = _write(write_dataset_card, state, unreadable)
    report, report_error = _write(write_report, state, unreadable) if job.spec.report else (None, None)
    return Finish(card, report, card_error, report_error)


def _write(writer: Callable[[OutputState], str], state: OutputState | None,
           unreadable: str | None) -> tuple[str | None, str | None]:
    """(location, None), or (None, why not)."""
    if state is None:
        return None, unreadable
    try:
        return writer(state), None
    except Exception as exc:  # noqa: BLE001 - the job itself is done
        return None, first_line(exc)


def write_run_record(storage: Storage, job: ResolvedJob, summary: RunSummary) -> None:
    """`_runs/<time>.json`: the summary's figures when the run ends."""
    record = {name: value for name, value in summary.__dict__.items() if name != "finish"}
    record["throughput"] = summary.throughput.to_dict() if summary.throughput else None
    record["run_key"] = run_key(job.spec.model, job.spec.defaults())  # what later cost lines compare against
    record["fingerprint"] = job.fingerprint
    record["finished"] = time.time()
    name = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"
    storage.put_bytes(layout.run_record_key(name), json.dumps(record, indent=2, default=str).encode())
