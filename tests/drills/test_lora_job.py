"""LoRA adapters end to end (issue 17): `zimage-batch run` on real Ray with adapters declared per
job and chosen per row, resumed with a new adapter from S3 for new rows; every image equals
diffusers' ZImagePipeline with the same adapters and scales, and a changed adapter file is refused
as another job."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_in_process import cli_in_process, local_ray
from output_check import check_exactly_once, pixels, read_images

from zimage_batch.inputs.lora_spec import resolve_lora
from zimage_batch.model.adapters import file_sha256
from zimage_batch.model.tiny import make_tiny_model
from zimage_batch.model.tiny_adapters import make_tiny_adapter
from zimage_batch.storage import open_storage

FIRST = [None, "none", "style", "style:0.8", "style:0.5,detail:1.5", "detail:1.5 , style:0.5", None]
SECOND = ["ink", "ink:0.6,style", None, "none", "detail"]
DEFAULT = "detail:0.7"
SIZE, STEPS = 64, 4


@pytest.fixture(scope="module")
def own_cache_cluster(tmp_path_factory, s3_server):
    """A local cluster whose driver and workers keep adapters fetched from S3 in a cache of this
    module's own (ZIMAGE_BATCH_CACHE set before the cluster starts, so that its workers see it)."""
    cache = str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZIMAGE_BATCH_CACHE", cache)
        with local_ray():
            yield cache


def _part(path, start: int, specs: list) -> list[str]:
    ids = [f"row-{start + i:03d}" for i in range(len(specs))]
    prompts = [f"a watercolor fox, study {start + i}" for i in range(len(specs))]
    pq.write_table(pa.table({"id": ids, "prompt": prompts, "seed": [start + i for i in range(len(specs))],
                             "lora": pa.array(specs, pa.string())}), path)
    return ids


def _pipeline(model: str, files: dict[str, str]):
    """A fresh ZImagePipeline with `load_lora_weights(file, adapter_name=name)` for each adapter."""
    from diffusers import ZImagePipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = ZImagePipeline.from_pretrained(model)
        for name, path in files.items():
            pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(pipes: dict, row: dict) -> np.ndarray:
    """The row through diffusers: set_adapters(names, scales), or a pipeline without adapters."""
    adapters = resolve_lora(row["lora"] or "none", None)
    pipe = pipes["lora"] if adapters else pipes["plain"]
    if adapters:
        pipe.set_adapters([n for n, _ in adapters], [s for _, s in adapters])
    out = pipe(prompt=row["prompt"], width=SIZE, height=SIZE, num_inference_steps=STEPS, guidance_scale=0.0,
               generator=torch.Generator("cpu").manual_seed(row["seed"]), output_type="np").images[0]
    return (out * 255).round().astype(np.uint8)


@pytest.mark.usefixtures("one_torch_thread")
def test_lora_job_matches_diffusers_across_batches_and_a_resume(tmp_path, s3_bucket, own_cache_cluster):
    # the CLI runs in this process, on the module's local cluster
    tiny = make_tiny_model(tmp_path / "tiny", "turbo")  # the CLI's make-tiny-model --lora: test_lora_demo.py
    for name in ("style", "detail"):
        make_tiny_adapter(tiny, tiny / f"{name}.safetensors", name)
    make_tiny_adapter(tiny, tiny / "ink.safetensors", "ink", "kohya")  # community keys (lora_unet_...)
    ink_uri = f"s3://{s3_bucket}/loras/ink.safetensors"
    open_storage(f"s3://{s3_bucket}/loras").put_file("ink.safetensors", tiny / "ink.safetensors")

    manifest, out = tmp_path / "manifest", tmp_path / "out"
    manifest.mkdir()
    ids = _part(manifest / "part-0.parquet", 0, FIRST)
    base = ["run", "--manifest", str(manifest), "--output", str(out), "--model", str(tiny), "--batch-size", "2",
            "--shard-size", "4", "--set", f"width={SIZE}", "--set", f"height={SIZE}", "--set", f"num_inference_steps={STEPS}",
            "--set", f"loras.style={tiny / 'style.safetensors'}", "--set", f"loras.detail={tiny / 'detail.safetensors'}",
            "--set", f"lora={DEFAULT}", "--set", "report=false"]
    first = cli_in_process(*base)
    assert first.returncode == 0, first.stderr

    # New rows choose a new adapter (from S3): the same job, resumed
    ids += _part(manifest / "part-1.parquet", 100, SECOND)
    second = cli_in_process(*base, "--set", f"loras.ink={ink_uri}")
    assert second.returncode == 0, second.stderr
    assert "2 shards already committed, 2 to run" in second.stdout

    rows = check_exactly_once(str(out), ids)
    by_id = {r["id"]: r for r in rows}
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["error"]]
    assert by_id["row-000"]["lora"] == "detail:0.7" and by_id["row-001"]["lora"] is None
    assert by_id["row-004"]["lora"] == by_id["row-005"]["lora"] == "detail:1.5,style:0.5"
    assert by_id["row-101"]["lora"] == "ink:0.6,style:1.0" and by_id["row-103"]["lora"] is None
    record = json.loads((out / "job.json").read_text())
    assert sorted(record["adapters"]) == ["detail", "ink", "style"]
    assert record["adapters"]["ink"] == {"source": ink_uri, "sha256": file_sha256(tiny / "ink.safetensors"),
                                         "file": "ink.safetensors"}

    files = {name: str(tiny / f"{name}.safetensors") for name in ("style", "detail", "ink")}
    pipes = {"plain": _pipeline(str(tiny), {}), "lora": _pipeline(str(tiny), files)}
    images = read_images(str(out), rows)
    for row in rows:
        want = _reference(pipes, row)
        got = pixels(images[row["id"]])
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, f"{row['id']} ({row['lora']})"

    # Another file under a recorded adapter's name is another job: refused, nothing written
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    make_tiny_adapter(tiny, tiny / "style.safetensors", "another-style")
    refused = cli_in_process(*base, "--set", f"loras.ink={ink_uri}")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "LoRA adapter 'style' was another file" in refused.stderr and "--overwrite" in refused.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
