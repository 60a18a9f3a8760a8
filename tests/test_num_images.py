"""Several images per prompt: image k of a row is diffusers' ZImagePipeline at
seed + k, one metadata row per image with `image_index`, keys unique per (id, image_index), exactly
once through flaky storage; one text encoding per distinct prompt; batches sized from their own
shape. Exactly once per image through a driver SIGKILL, a resume with appended rows and a worker
SIGKILL: tests/test_readers_see_committed.py, whose kill drills run rows of 1 to 3 images."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from output_check import check_exactly_once, pixels, read_images, read_metadata

from zimage_batch.inputs.manifest import ManifestError, open_manifest
from zimage_batch.inputs.validation import Limits, validate_manifest
from zimage_batch.jobspec import JobError, JobSpec, load_job
from zimage_batch.output.keys import safe_key, sample_key
from zimage_batch.settings import MAX_NUM_IMAGES

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


def test_one_text_encoding_per_distinct_prompt():
    """A row's images and rows repeating a prompt share one text-encoder pass, within a batch and
    across consecutive batches (a row's images cut by the batch size)."""
    from zimage_batch.generate.engine import Engine
    from zimage_batch.generate.requests import GenerationRequest
    from zimage_batch.model.sources import resolve_model

    engine = Engine(resolve_model("tiny:turbo").path, "turbo", device="cpu")
    passes: list[int] = []
    engine.pipe.text_encoder.register_forward_pre_hook(lambda module, args, kwargs: passes.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    prompts = ["a red boat"] * 4 + ["一只猫"] * 3 + ["a red boat"] * 2  # two rows of one prompt, one of another
    requests = [GenerationRequest(p, 100 + k, 64, 64, 2, 0.0) for k, p in enumerate(prompts)]
    images = engine.generate(requests, batch_size=len(requests))
    assert passes == [2] and engine.prompts.encoded == 2
    passes.clear()
    engine.generate(requests[:3], batch_size=3)  # the previous batch's prompts come from its cache
    assert passes == [] and engine.prompts.encoded == 2
    again = engine.generate(requests[:2] + requests[4:6], batch_size=2)
    assert passes == [1] and engine.prompts.encoded == 3  # the cat again; the boat was in the batch before
    for a, b in zip(again, [images[0], images[1], images[4], images[5]]):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # shared embeddings, same pixels


def test_num_images_is_checked_like_every_column(tmp_path):
    limits = Limits("turbo", 64, 64, 8, 0.0, default_num_images=1)
    cases = [([1, 0], "num_images", "must be >= 1"), ([1, MAX_NUM_IMAGES + 1], "num_images", f"must be <= {MAX_NUM_IMAGES}")]
    for values, column, problem in cases:
        _write(tmp_path / "m.parquet", [{**ROWS[0], "id": f"x{i}", "num_images": v} for i, v in enumerate(values)])
        with pytest.raises(ManifestError, match=re.escape(f"m.parquet: column '{column}' {problem}") + r".*row 1 \(id='x1'\)"):
            validate_manifest(open_manifest(str(tmp_path / "m.parquet")), limits)
    _write(tmp_path / "m.parquet", [{**ROWS[0], "seed": 2**63 - 2, "num_images": 3}])
    with pytest.raises(ManifestError, match=r"column 'seed' leaves no room for its images' seeds.*row 0"):
        validate_manifest(open_manifest(str(tmp_path / "m.parquet")), limits)
    _write(tmp_path / "m.parquet", [{**ROWS[0], "seed": 2**63 - 2, "num_images": None}])
    validate_manifest(open_manifest(str(tmp_path / "m.parquet")), limits)  # 1 image: seed 2**63 - 2 fits
    with pytest.raises(JobError, match=f"num_images must be in 1..{MAX_NUM_IMAGES}"):
        load_job(None, {"manifest": "m", "output": "o"}, [f"num_images={MAX_NUM_IMAGES + 1}"])
    # the default leaves every existing job's fingerprint as it was
    assert JobSpec(model="tiny:turbo").fingerprint() != JobSpec(model="tiny:turbo", num_images=2).fingerprint()


def test_batches_are_sized_from_their_own_shape():
    from zimage_batch.run.batching import BatchSizer

    cpu = BatchSizer(None, cuda=False, low_vram=False)
    assert (cpu.size(64, 64), cpu.size(256, 256), cpu.size(1024, 1024)) == (64, 16, 1)
    gpu = BatchSizer(None, cuda=True, low_vram=False, free_bytes=40 * 2**30)
    assert (gpu.size(1024, 1024), gpu.size(512, 512), gpu.size(2048, 2048)) == (12, 16, 3)
    assert BatchSizer(8, cuda=False, low_vram=False).size(1024, 1024) == 8  # --batch-size wins


def test_a_model_folder_batches_small_rows_by_their_size(tmp_path):
    """A model given as a folder has 1024² defaults; rows of 64² still run 64 to a batch on CPU."""
    from zimage_batch.model.tiny import make_tiny_model
    from zimage_batch.output.ledger import Ledger
    from zimage_batch.run.plan import make_plan
    from zimage_batch.run.preflight import job_record, prepare
    from zimage_batch.run.worker import ShardRunner
    from zimage_batch.storage import open_storage

    folder = make_tiny_model(tmp_path / "model", "turbo")
    rows = [{"id": f"s{i}", "prompt": "a fox", "seed": i, "width": 64 if i % 2 else 128, "height": 64,
             "num_images": None, "topic": None} for i in range(70)]
    _write(tmp_path / "m.parquet", rows)
    job = load_job(None, {"manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "out"),
                          "model": str(folder), "shard_size": 70}, ["report=false", "num_inference_steps=2"])
    assert job.defaults()["width"] == 1024 and job.batch_size is None
    prepared = prepare(job)
    resolved = prepared.job
    Ledger(open_storage(job.output)).claim_output(job_record(resolved, prepared.model), False)
    (shard,) = make_plan(prepared.manifest, {}, job.shard_size, resolved.variant).todo
    runner = ShardRunner(resolved.worker_settings(resolved.variant))
    batches: list[int] = []
    runner.engine.pipe.transformer.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    marker = runner.run_shard(shard)
    assert marker.ok == 70 and runner.warm_shape == (128, 64)
    steps = 2
    assert sorted(batches[::steps]) == [35, 35]  # one batch per shape (64 would fit each), not 70 batches of 1
