"""What a reader that globs OUTPUT sees (SPEC §5.5): only committed shards, never a partial one.

Training loaders and query engines do not read `_commits/`: they glob `metadata/*.parquet`,
`shards/*.tar` and `data/*.parquet`. Each scenario stops a run part-way (a shard that fails at
its last step, the driver and its cluster killed, a worker killed), reads OUTPUT with the real
clients (DuckDB, webdataset, Hugging Face `datasets`), then reruns and reads again.
"""

from __future__ import annotations

import glob
import os
import signal
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pytest
from output_check import check_exactly_once, pixels, read_images
from test_fault_tolerance import _start_run, _wait_for_commits, _worker_processes
from test_job_e2e import make_manifest, reference_pixels

from zimage_batch.model.sources import resolve_model
from zimage_batch.output.ledger import Ledger
from zimage_batch.run.worker import FAIL_BEFORE_COMMIT_ENV
from zimage_batch.storage import open_storage


def committed(out: Path) -> dict:
    return Ledger(open_storage(str(out))).committed()


def globbed_metadata(out: Path, files: list[str] | None = None) -> list[tuple[str, str]]:
    """(id, status) of every row DuckDB finds under metadata/ (or in `files`, globbed there)."""
    files = sorted(glob.glob(f"{out}/metadata/*.parquet")) if files is None else files
    if not files:
        return []
    return duckdb.sql(f"SELECT id, status FROM read_parquet({files!r})").fetchall()


def globbed_samples(out: Path, urls: list[str] | None = None) -> list[str]:
    """Keys of every sample webdataset finds in shards/*.tar (or `urls`); every tar must read whole."""
    import webdataset as wds

    urls = sorted(glob.glob(f"{out}/shards/*.tar")) if urls is None else urls
    for url in urls:
        with tarfile.open(url) as tar:  # a partial tar raises here
            for member in tar.getmembers():
                tar.extractfile(member).read()
    if not urls:
        return []
    return [sample["__key__"] for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def loaded_dataset_rows(files: list[str], cache: Path) -> int:
    """Rows Hugging Face `datasets` loads from these data/*.parquet files."""
    import datasets

    if not files:
        return 0
    return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(cache)).num_rows


def check_only_committed_rows_are_seen(out: Path, fmt: str, cache: Path) -> int:
    """Every row a globbing reader sees belongs to a committed shard, once, with all of its
    shard's rows; returns how many rows it sees. The readers go first and the commit markers are
    read after them: a run may still be publishing (a worker outlives its killed driver for a
    moment), and a shard is committed before it is published, so whatever a reader found must
    be committed by the time the markers are read."""
    metadata_files = sorted(glob.glob(f"{out}/metadata/*.parquet"))
    rows = globbed_metadata(out, metadata_files)
    container_files = sorted(glob.glob(f"{out}/shards/*.tar" if fmt == "webdataset" else f"{out}/data/*.parquet"))
    samples = globbed_samples(out, container_files) if fmt == "webdataset" else []
    loaded = loaded_dataset_rows(container_files, cache) if fmt == "parquet" else 0
    markers = committed(out)

    ids = [row_id for row_id, _ in rows]
    assert len(ids) == len(set(ids)), "a row appears twice under metadata/"
    seen_shards = {Path(p).stem for p in metadata_files}
    assert seen_shards <= set(markers), f"metadata of uncommitted shards: {seen_shards - set(markers)}"
    assert len(ids) == sum(markers[s].rows for s in seen_shards), "a shard's metadata is partial"
    containers = {Path(p).stem for p in container_files}
    if fmt in ("webdataset", "parquet"):
        assert containers <= set(markers), f"{fmt} files of uncommitted shards: {containers - set(markers)}"
    if fmt == "webdataset":
        assert len(samples) == len(set(samples)) == sum(markers[s].ok for s in containers)
    if fmt == "parquet":
        assert loaded == sum(markers[s].ok for s in containers)
    return sum(1 for _, status in rows if status == "ok")


def rerun(manifest: Path, out: Path, fmt: str) -> None:
    proc = _start_run(manifest, out, "--format", fmt, "--shard-size", "10", "--set", "report=false")
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-2000:]


def test_a_shard_failing_at_its_last_step_is_never_seen(tmp_path):
    """Its images and metadata were staged; the commit never came: readers see none of it."""
    manifest, out = tmp_path / "m.parquet", tmp_path / "out"
    ids = make_manifest(manifest, 30)
    proc = _start_run(manifest, out, "--format", "webdataset", "--shard-size", "10", "--set", "max_attempts=1",
                      "--set", "report=false", env={FAIL_BEFORE_COMMIT_ENV: "-0000000010"})
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode != 0 and "injected failure before the commit" in stdout + stderr
    assert check_only_committed_rows_are_seen(out, "webdataset", tmp_path / "hf") == 20
    assert not glob.glob(f"{out}/shards/*-0000000010.tar") and not glob.glob(f"{out}/metadata/*-0000000010.parquet")
    rerun(manifest, out, "webdataset")
    check_exactly_once(str(out), ids)
    assert len(globbed_samples(out)) == len(globbed_metadata(out)) == 30


@pytest.mark.parametrize("victim", ["driver", "worker"])
def test_a_run_killed_part_way_shows_only_committed_shards(tmp_path, victim):
    """The driver with its whole local cluster (SIGKILL to its process group), or one worker
    (SIGKILL, the run goes on): at that moment and after, a reader sees whole committed shards
    only; a rerun completes the output exactly once."""
    manifest, out = tmp_path / "m.parquet", tmp_path / "out"
    ids = make_manifest(manifest, 120)
    fmt = "parquet" if victim == "driver" else "webdataset"
    proc = _start_run(manifest, out, "--format", fmt, "--shard-size", "10", "--set", "report=false")
    try:
        _wait_for_commits(out, 2, proc)
        if victim == "driver":
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        else:
            workers = _worker_processes(proc.pid)
            assert workers, "no worker actor process found"
            workers[0].send_signal(signal.SIGKILL)
        seen = check_only_committed_rows_are_seen(out, fmt, tmp_path / "hf")
        assert seen < 120 and len(committed(out)) >= 2
        if victim == "worker":
            stdout, stderr = proc.communicate(timeout=400)
            assert proc.returncode == 0, stderr[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if victim == "driver":
        rerun(manifest, out, fmt)
    rows = {r["id"]: r for r in check_exactly_once(str(out), ids)}
    assert check_only_committed_rows_are_seen(out, fmt, tmp_path / "hf") == 120
    if victim == "worker":
        assert "retrying" in stdout  # the killed worker's shard ran again on its replacement
    # rows of shards committed before the stop and after it draw what diffusers draws
    model_path = resolve_model("tiny:turbo").path
    for row_id, data in read_images(str(out), [rows[i] for i in ("row-00000", "row-00061", "row-00119")]).items():
        diff = np.abs(pixels(data).astype(int) - reference_pixels(model_path, rows[row_id]).astype(int)).max()
        assert diff <= 1, f"{row_id}: max pixel difference {diff}"
