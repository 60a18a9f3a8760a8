"""The end of a run (run/finish.py): the run record always; the dataset card and the report
when they can be written, else a warning each, never an exception (the rows are committed)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from zimage_batch.jobspec import JobSpec
from zimage_batch.run.finish import finish_run
from zimage_batch.run.summary import Finish, RunSummary
from zimage_batch.storage import open_storage


def _job(report: bool) -> SimpleNamespace:
    """What the finish reads of a resolved job."""
    return SimpleNamespace(spec=JobSpec(manifest="m", output="o", model="tiny:turbo", report=report), fingerprint="f")


def test_a_card_and_report_that_cannot_be_written_are_warnings_and_the_record_is_written(tmp_path):
    storage = open_storage(str(tmp_path / "out"))  # no job.json: neither card nor report can be rendered
    summary = RunSummary(output=storage.uri, rows_total=3, run="r1")
    finish = finish_run(storage, _job(report=True), summary, [])
    assert finish.card is None and finish.report is None
    assert "holds no job" in finish.card_error and finish.report_error == finish.card_error
    assert [warning for _, warning in finish.lines()] == [True, True]
    assert finish.lines()[0][0].startswith("could not write the dataset card: ")
    (record_file,) = (tmp_path / "out" / "_runs").glob("*.json")
    record = json.loads(record_file.read_text())
    assert "finish" not in record and record["run"] == "r1" and record["fingerprint"] == "f"
    assert list(record)[:3] == ["output", "rows_total", "rows_ok"]  # the summary's fields, in their order
    assert finish_run(storage, _job(report=False), summary, []).report_error is None  # report: false asks for none


def test_the_finish_says_the_card_first_then_the_report():
    finish = Finish(card="o/README.md", report=None, report_error="disk full")
    assert finish.lines() == [("dataset card: o/README.md", False), ("could not write the report: disk full", True)]
    assert Finish().lines() == []


def test_a_run_that_lost_the_lease_writes_its_record_but_leaves_card_and_report_to_the_holder(tmp_path):
    storage = open_storage(str(tmp_path / "out"))
    summary = RunSummary(output=storage.uri, rows_total=3, run="r1", lost_lease="run r2 took OUTPUT's lease over")
    finish = finish_run(storage, _job(report=True), summary, [])
    assert finish == Finish() and finish.lines() == []  # nothing tried, nothing to warn about
    assert len(list((tmp_path / "out" / "_runs").glob("*.json"))) == 1
    assert not (tmp_path / "out" / "README.md").exists() and not (tmp_path / "out" / "report.html").exists()
