"""The Python API: the CLI's run, validate and status from Python, with the CLI's semantics."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from output_check import check_exactly_once
from test_job_e2e import make_manifest

import zimage_batch
from zimage_batch import api
from zimage_batch.inputs.manifest import ManifestError
from zimage_batch.jobspec import JobError
from zimage_batch.output import layout
from zimage_batch.run.driver import RunSummary
from zimage_batch.storage import LocalStorage


def test_a_job_runs_through_the_api_and_reads_back_its_status(tmp_path, monkeypatch):
    ids = make_manifest(tmp_path / "m.parquet", 8)
    job_file = tmp_path / "job.yaml"
    job_file.write_text("manifest: m.parquet\noutput: out\nmodel: tiny:turbo\nshard_size: 100\n", encoding="utf-8")
    commit_listings = _count_commit_listings(monkeypatch)
    lines: list[str] = []
    summary = api.run(job_file, echo=lines.append, shard_size=4, workers=1, report=False)  # settings win over the file
    assert summary.ok and summary.exit_code == 0 and summary.problem is None
    assert (summary.rows_ok, summary.rows_left, summary.shards_committed) == (8, 0, 2)
    assert summary.output == str(tmp_path / "out") and lines[1].startswith("plan: 8 rows in 2 shards")
    assert "images will be noise" in lines[0]  # a tiny model says so first
    assert commit_listings == [1, 1]  # `_commits/` read once to plan and once at the end (record, card)
    check_exactly_once(summary.output, ids)
    figures = zimage_batch.status(tmp_path / "out")
    assert figures["state"] == "finished" and figures["rows_done"] == 8 and figures["rows_left"] == 0
    assert not (tmp_path / "out" / "report.html").exists()
    # the API writes the dataset card as the CLI does: load_dataset(OUTPUT) yields the metadata, not bare images
    card = tmp_path / "out" / "README.md"
    assert summary.finish.card == str(card) and f"dataset card: {card}" in lines and summary.finish.report is None
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(str(tmp_path / "out"), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert {"id", "prompt", "seed", "status", "image", "sha256", "model"} <= set(ds.column_names)
    assert sorted(ds["id"]) == sorted(ids) and set(ds["status"]) == {"ok"}


def _count_commit_listings(monkeypatch) -> list[int]:
    """Listings of `_commits/` by this process (the driver; workers never list it), one entry each."""
    listings: list[int] = []
    original = LocalStorage.list

    def counting(self, prefix=""):
        if prefix == layout.COMMITS:
            listings.append(1)
        return original(self, prefix)

    monkeypatch.setattr(LocalStorage, "list", counting)
    return listings


def test_validate_checks_a_manifest_without_a_model(tmp_path):
    make_manifest(tmp_path / "m.parquet", 5)
    checked = zimage_batch.validate(tmp_path / "m.parquet")
    assert checked == api.ManifestSummary(rows=5, files=1, kind="prompt", variants=("turbo",))
    assert api.validate(tmp_path / "m.parquet", model="tiny:base").variants == ("base",)
    pq.write_table(pa.table({"id": ["a", "a"], "prompt": ["x", "y"]}), tmp_path / "dup.parquet")
    with pytest.raises(ManifestError, match="duplicate"):
        api.validate(tmp_path / "dup.parquet")
    with pytest.raises(JobError, match="width 4096 is beyond the turbo model's limits"):
        api.validate(tmp_path / "m.parquet", width=4096)


def test_bad_settings_are_refused_before_anything_is_written(tmp_path):
    make_manifest(tmp_path / "m.parquet", 2)
    with pytest.raises(JobError, match="unknown job setting"):
        api.run(manifest=str(tmp_path / "m.parquet"), output=str(tmp_path / "out"), widht=512)
    with pytest.raises(JobError, match="multiple of 16"):
        api.run(manifest=str(tmp_path / "m.parquet"), output=str(tmp_path / "out"), width=100)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("summary, code, problem", [
    (RunSummary("o", 20, rows_ok=19, rows_error=1), 0, None),
    (RunSummary("o", 20), 1, "20 of 20 rows are neither committed nor failed; run again to finish them"),
    (RunSummary("o", 20, rows_ok=10, failed={"s1": "x"}), 1, "1 shard(s) failed, 10 rows left; rerun to retry them"),
    (RunSummary("o", 20, rows_ok=10, stopped=True), 130, "stopped before the end with 10 rows left; run again to resume"),
])
def test_the_exit_code_is_zero_only_when_every_row_is_committed(summary, code, problem):
    assert (summary.exit_code, summary.problem, summary.ok) == (code, problem, code == 0)
