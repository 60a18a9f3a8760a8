"""Several images per prompt: image k of a row is diffusers' ZImagePipeline at
seed + k, one metadata row per image with `image_index`, keys unique per (id, image_index), exactly
once through flaky storage (the checks without Ray: tests/unit/test_num_images_rules.py). Exactly
once per image through a driver SIGKILL, a resume with appended rows and a worker SIGKILL:
tests/drills/test_readers_see_committed.py, whose kill drills run rows of 1 to 3 images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from output_check import check_exactly_once, pixels, read_images, read_metadata

from zimage_batch.jobspec import JobSpec
from zimage_batch.output.keys import safe_key, sample_key

SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("width", pa.int64()),
                    ("height", pa.int64()), ("num_images", pa.int64()), ("topic", pa.string())])
ROWS = [  # num_images 1-4 and the job's 2, mixed sizes, a Chinese prompt, a derived seed
    {"id": "r1", "prompt": "一只可爱的小猫坐在窗台上", "seed": 11, "width": 64, "height": 64, "num_images": 1, "topic": "cat"},
    {"id": "r2", "prompt": "a lighthouse at dusk", "seed": 22, "width": 96, "height": 64, "num_images": 4, "topic": "sea"},
    {"id": "r3", "prompt": "a lighthouse at dusk", "seed": None, "width": 64, "height": 96, "num_images": 3, "topic": "sea"},
    {"id": "r4", "prompt": "夕阳下的古城", "seed": 44, "width": None, "height": None, "num_images": None, "topic": "town"},
]
JOB_NUM_IMAGES = 2
IMAGES = {"r1": 1, "r2": 4, "r3": 3, "r4": JOB_NUM_IMAGES}


def _write(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """The same rows in every format, on one fresh local Ray cluster."""
    import ray

    from zimage_batch.run.driver import run_job

    tmp = tmp_path_factory.mktemp("num-images")
    _write(tmp / "m.parquet", ROWS)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    out = {}
    try:
        for fmt in ("files", "webdataset", "parquet"):
            job = JobSpec(manifest=str(tmp / "m.parquet"), output=str(tmp / fmt), model="tiny:turbo", format=fmt,
                          workers=1, shard_size=2, num_images=JOB_NUM_IMAGES)
            summary = run_job(job, echo=lambda line: None)
            assert summary.exit_code == 0 and summary.rows_ok == sum(IMAGES.values())
            out[fmt] = str(tmp / fmt)
    finally:
        ray.shutdown()
    return out


def _reference(row: dict, seed: int) -> np.ndarray:
    from diffusers import ZImagePipeline

    from zimage_batch.model.sources import resolve_model

    global _PIPE
    if "_PIPE" not in globals():
        _PIPE = ZImagePipeline.from_pretrained(resolve_model("tiny:turbo").path)
        _PIPE.set_progress_bar_config(disable=True)
    image = _PIPE(prompt=row["prompt"], width=row["width"], height=row["height"], num_inference_steps=8,
                  guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    return (image * 255).round().astype(np.uint8)


def test_image_k_is_the_reference_pipeline_at_seed_plus_k_in_every_format(outputs):
    references: dict = {}
    for fmt, output in outputs.items():
        rows = check_exactly_once(output, [r["id"] for r in ROWS], IMAGES)
        images = read_images(output, rows)
        for meta in rows:
            base = next(r for r in ROWS if r["id"] == meta["id"])
            first_seed = meta["seed"] - meta["image_index"]
            if base["seed"] is not None:
                assert first_seed == base["seed"]
            key = (meta["id"], meta["image_index"])
            if key not in references:
                references[key] = _reference(meta, meta["seed"])
            diff = np.abs(pixels(images[key]).astype(int) - references[key].astype(int)).max()
            assert diff <= 1, f"{fmt} {key}: max pixel difference {diff}"
    derived = {m["seed"] - m["image_index"] for m in read_metadata(outputs["files"]) if m["id"] == "r3"}
    assert len(derived) == 1  # one derived seed for the row, + k per image


def test_one_metadata_row_per_image_with_unique_keys(outputs):
    for fmt, output in outputs.items():
        rows = read_metadata(output)
        assert sorted((r["id"], r["image_index"]) for r in rows) == sorted(
            (i, k) for i, n in IMAGES.items() for k in range(n))
        locations = [r["image"] for r in rows]
        assert len(set(locations)) == len(locations)
        for r in rows:
            assert sample_key(r["id"], r["image_index"]) == f"{safe_key(r['id'])}_{r['image_index']}"
            assert sample_key(r["id"], r["image_index"]) in r["image"] and r["topic"] is not None
        if fmt == "parquet":
            data = pq.read_table(Path(output) / "data").to_pylist()
            assert sorted((d["id"], d["image_index"]) for d in data) == sorted((r["id"], r["image_index"]) for r in rows)


def test_exactly_once_per_image_through_flaky_storage(flaky_s3, s3_bucket, tmp_path, ray_tmpdir):
    import subprocess
    import sys

    from fault_proxy import KINDS, endpoint_env

    from zimage_batch.storage import open_storage

    rows = [{"id": f"s{i:03d}", "prompt": f"a harbour, view {i}", "seed": 3 * i, "width": None, "height": None,
             "num_images": None, "topic": "t"} for i in range(40)]
    _write(tmp_path / "m.parquet", rows)
    open_storage(f"s3://{s3_bucket}/manifests").put_file("m.parquet", tmp_path / "m.parquet")
    output = f"s3://{s3_bucket}/out-num-images"
    flaky_s3.set_faults(0.15, KINDS, seed=5)
    result = subprocess.run(
        [sys.executable, "-m", "zimage_batch.cli", "run", "--manifest", f"s3://{s3_bucket}/manifests/m.parquet",
         "--output", output, "--model", "tiny:turbo", "--format", "webdataset", "--shard-size", "10",
         "--set", "num_images=2", "--set", "report=false"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_TMPDIR": ray_tmpdir},
    )
    requests, counts = flaky_s3.stats()
    flaky_s3.set_faults(0.0)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert sum(counts.values()) > 0, counts
    with endpoint_env(flaky_s3.upstream):  # read back directly, not through the proxy
        check_exactly_once(output, [r["id"] for r in rows], 2)
