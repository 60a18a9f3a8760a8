"""What a reader that globs OUTPUT sees: only committed shards, never a partial one.

Training loaders and query engines do not read `_commits/`: they glob `metadata/*.parquet`,
`shards/*.tar` and `data/*.parquet`. Each scenario stops a run part-way (a shard that fails at
its last step, the driver and its cluster killed, a worker killed), reads OUTPUT with the real
clients (DuckDB, webdataset, Hugging Face `datasets`), then reruns and reads again. The kill
drills run rows of 1 to 3 images: exactly once holds per image.
"""

from __future__ import annotations

import glob
import os
import signal
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
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


def globbed_metadata(out: Path, files: list[str] | None = None) -> list[tuple[str, int, str]]:
    """(id, image_index, status) of every row DuckDB finds under metadata/ (or in `files`, globbed
    there); image_index is 0 in a job without num_images."""
    files = sorted(glob.glob(f"{out}/metadata/*.parquet")) if files is None else files
    if not files:
        return []
    index = "image_index" if "image_index" in duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet({files!r})").df()[
        "column_name"].tolist() else "0"
    return duckdb.sql(f"SELECT id, {index}, status FROM read_parquet({files!r})").fetchall()


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
    """Every image a globbing reader sees belongs to a committed shard, once, with all of its
    shard's images; returns how many stored images it sees. The readers go first and the commit markers are
    read after them: a run may still be publishing (a worker outlives its killed driver for a
    moment), and a shard is committed before it is published, so whatever a reader found must
    be committed by the time the markers are read."""
    metadata_files = sorted(glob.glob(f"{out}/metadata/*.parquet"))
    rows = globbed_metadata(out, metadata_files)
    container_files = sorted(glob.glob(f"{out}/shards/*.tar" if fmt == "webdataset" else f"{out}/data/*.parquet"))
    samples = globbed_samples(out, container_files) if fmt == "webdataset" else []
    loaded = loaded_dataset_rows(container_files, cache) if fmt == "parquet" else 0
    markers = committed(out)

    images = [(row_id, index) for row_id, index, _ in rows]
    assert len(images) == len(set(images)), "an image appears twice under metadata/"
    seen_shards = {Path(p).stem for p in metadata_files}
    assert seen_shards <= set(markers), f"metadata of uncommitted shards: {seen_shards - set(markers)}"
    assert len(images) == sum(markers[s].ok + markers[s].error for s in seen_shards), "a shard's metadata is partial"
    containers = {Path(p).stem for p in container_files}
    if fmt in ("webdataset", "parquet"):
        assert containers <= set(markers), f"{fmt} files of uncommitted shards: {containers - set(markers)}"
    if fmt == "webdataset":
        assert len(samples) == len(set(samples)) == sum(markers[s].ok for s in containers)
    if fmt == "parquet":
        assert loaded == sum(markers[s].ok for s in containers)
    return sum(1 for *_, status in rows if status == "ok")


def rerun(manifest: Path, out: Path, *args: str, env: dict | None = None) -> str:
    proc = _start_run(manifest, out, *args, env=env)
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-2000:]
    return stdout


def several_images_manifest(path: Path, n: int, appended: int = 0) -> dict[str, int | None]:
    """make_manifest's first `n` rows with num_images 1, 2, 3, 1, ... and `appended` rows after them
    with a null num_images (the job's); returns each id's num_images."""
    ids = make_manifest(path, n + appended)
    counts = [1 + i % 3 for i in range(n)] + [None] * appended
    pq.write_table(pq.read_table(path).append_column("num_images", pa.array(counts, pa.int64())), path)
    return dict(zip(ids, counts))


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
    rerun(manifest, out, "--format", "webdataset", "--shard-size", "10", "--set", "report=false")
    check_exactly_once(str(out), ids)
    assert len(globbed_samples(out)) == len(globbed_metadata(out)) == 30


@pytest.mark.parametrize("victim", ["driver", "worker"])
def test_a_run_killed_part_way_shows_only_committed_shards(tmp_path, victim, ray_tmpdir):
    """The driver with its whole local cluster (SIGKILL to its process group), or one worker
    (SIGKILL, the run goes on): at that moment and after, a reader sees whole committed shards
    only. After the driver's kill, rows are appended and the rerun does them and the rest of the
    output without redoing a committed shard; every image is there exactly once, nothing is left
    under `_staging/` and no worker's temporary files are left in TMPDIR."""
    manifest, out = tmp_path / "m.parquet", tmp_path / "out"
    images = several_images_manifest(manifest, 60)  # 120 images
    fmt = "parquet" if victim == "driver" else "webdataset"
    args = ("--format", fmt, "--shard-size", "5", "--set", "num_images=2", "--set", "report=false")
    scratch_tmp = Path(ray_tmpdir) / "t"  # short: Ray puts its sockets under RAY_TMPDIR
    scratch_tmp.mkdir()
    env = {"RAY_TMPDIR": ray_tmpdir, "TMPDIR": str(scratch_tmp)}
    proc = _start_run(manifest, out, *args, env=env)  # one worker: the run ends only if a killed one is replaced
    try:
        _wait_for_commits(out, 2, proc)
        if victim == "driver":
            workers = _worker_processes(proc.pid)
            assert workers, "no worker actor process found"
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
            assert "retrying" in stdout  # the killed worker's shard ran again on its replacement
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if victim == "driver":
        _, alive = psutil.wait_procs(workers, timeout=60)  # a worker may outlive its driver for a moment, and commit
        assert not alive, f"workers still running after their driver's kill: {alive}"
        before = {p.name: p.stat().st_mtime_ns for p in (out / "_commits").glob("*.json")}
        done = sum(marker.ok + marker.error for marker in committed(out).values())
        images = several_images_manifest(manifest, 60, appended=7)  # the job's 2 images each
        stdout = rerun(manifest, out, *args, env=env)
        assert "already committed" in stdout and f"({120 + 14 - done:,} to generate)" in stdout, stdout
        # the killed driver's lease: taken over at once (its pid is dead on this host), not after its TTL
        assert "took over the lease" in stdout and "is no longer running on this host" in stdout, stdout
        after = {p.name: p.stat().st_mtime_ns for p in (out / "_commits").glob("*.json")}
        assert {name: after[name] for name in before} == before, "committed shards must not be redone"
    per_id = {row_id: n or 2 for row_id, n in images.items()}
    rows = {(r["id"], r["image_index"]): r for r in check_exactly_once(str(out), list(per_id), per_id)}
    assert not list(scratch_tmp.glob("zimage-batch-scratch/*")), "a worker's scratch folder was left behind"
    assert check_only_committed_rows_are_seen(out, fmt, tmp_path / "hf") == sum(per_id.values())
    # images of shards committed before the stop and after it draw what diffusers draws at seed + k
    model_path = resolve_model("tiny:turbo").path
    chosen = [rows[key] for key in rows if key[0] in ("row-00000", "row-00031", "row-00059", "row-00066")]
    for key, data in read_images(str(out), chosen).items():
        diff = np.abs(pixels(data).astype(int) - reference_pixels(model_path, rows[key]).astype(int)).max()
        assert diff <= 1, f"{key}: max pixel difference {diff}"
