"""A manifest whose rows name different variants, run on Ray: one worker pool per variant, exactly
once, each variant's pixels those of its diffusers pipeline."""

from __future__ import annotations

import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from cli_in_process import cli_in_process
from output_check import check_exactly_once, pixels, read_images

from zimage_batch.model.sources import resolve_model


def _manifest(path, start: int, n: int) -> list[str]:
    ids = [f"m-{i:04d}" for i in range(start, start + n)]
    variants = [("base" if i % 4 == 0 else ("turbo" if i % 4 == 1 else None)) for i in range(start, start + n)]
    steps = [6 if v == "base" else None for v in variants]
    pq.write_table(pa.table({"id": ids, "prompt": [f"a lantern #{i}" for i in range(start, start + n)],
                             "variant": pa.array(variants, pa.string()),
                             "num_inference_steps": pa.array(steps, pa.int64())}), path)
    return ids


def _run(manifest, out, *extra) -> subprocess.CompletedProcess:
    """The CLI in this process (on the module's local cluster, fixture `ray_local`)."""
    return cli_in_process("run", "--manifest", str(manifest), "--output", str(out), "--model", "tiny:turbo",
                          "--shard-size", "10", "--set", "report=false", *extra)


def test_rows_run_on_their_variant(tmp_path, ray_local):
    manifest, out = tmp_path / "m.parquet", tmp_path / "out"
    ids = _manifest(manifest, 0, 30)
    first = _run(manifest, out)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "variant base:" in first.stdout
    rows = check_exactly_once(str(out), ids)
    by_id = {r["id"]: r for r in rows}
    for i, row_id in enumerate(ids):
        want = "base" if i % 4 == 0 else "turbo"
        assert by_id[row_id]["variant"] == want and by_id[row_id]["model"] == f"tiny:{want}"
    base_shards = sorted(p.stem for p in (out / "_commits").glob("*-base.json"))
    assert len(base_shards) == 3

    # a base row's pixels are those of diffusers' ZImagePipeline with the tiny base checkpoint
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(resolve_model("tiny:base").path)
    pipe.set_progress_bar_config(disable=True)
    row = by_id["m-0004"]
    ref = pipe(prompt=row["prompt"], width=64, height=64, num_inference_steps=6, guidance_scale=row["guidance_scale"],
               generator=torch.Generator("cpu").manual_seed(row["seed"]), output_type="np").images[0]
    got = pixels(read_images(str(out), [row])["m-0004"])
    assert row["guidance_scale"] == 4.0
    assert np.abs(got.astype(int) - (ref * 255).round().astype(int)).max() <= 1
