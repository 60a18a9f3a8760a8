"""Several images per prompt, without Ray: `num_images` is checked like every column, one text encoding
per distinct prompt, batches sized from their own shape."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zimage_batch.inputs.manifest import ManifestError, open_manifest
from zimage_batch.inputs.validation import Limits, validate_manifest
from zimage_batch.jobspec import JobError, JobSpec, load_job
from zimage_batch.settings import MAX_NUM_IMAGES

SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("width", pa.int64()),
                    ("height", pa.int64()), ("num_images", pa.int64()), ("topic", pa.string())])


ROWS = [  # num_images 1-4 and the job's 2, mixed sizes, a Chinese prompt, a derived seed
    {"id": "r1", "prompt": "一只可爱的小猫坐在窗台上", "seed": 11, "width": 64, "height": 64, "num_images": 1, "topic": "cat"},
    {"id": "r2", "prompt": "a lighthouse at dusk", "seed": 22, "width": 96, "height": 64, "num_images": 4, "topic": "sea"},
    {"id": "r3", "prompt": "a lighthouse at dusk", "seed": None, "width": 64, "height": 96, "num_images": 3, "topic": "sea"},
    {"id": "r4", "prompt": "夕阳下的古城", "seed": 44, "width": None, "height": None, "num_images": None, "topic": "town"},
]


def _write(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


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
