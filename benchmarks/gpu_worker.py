"""The worker's CUDA path, shard by shard, without Ray: a device check for machines that
cannot install Ray (its wheel is larger than what the device tool carries).

    python benchmarks/gpu_worker.py            # on a CUDA machine
    python benchmarks/gpu_worker.py --device cpu

Plans a 40-row job on a tiny checkpoint exactly as `zimage-batch run` does (prepare, claim
OUTPUT, plan) and runs every shard through `ShardRunner` on the device (bf16 on CUDA, the
default batch size from free memory), twice: with the low-VRAM profile off and on. Checks that
every row is `ok` exactly once, and prints how far the two runs' pixels, and each row's pixels
against diffusers' ZImagePipeline drawing that row alone, are apart.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

PROMPTS = ["a photo of a cat", "一只可爱的小猫坐在窗台上", "a watercolor of mountains at dawn, very detailed, soft light",
           "a red vintage car"]


def run_job_in_process(model: str, manifest: Path, output: Path, device: str, low_vram: str) -> dict[str, np.ndarray]:
    """What `zimage-batch run` does, with the shards run here instead of on Ray actors."""
    from zimage_batch.jobspec import load_job
    from zimage_batch.output.ledger import Ledger
    from zimage_batch.run.plan import make_plan
    from zimage_batch.run.preflight import job_record, prepare
    from zimage_batch.run.worker import ShardRunner
    from zimage_batch.storage import open_storage

    job = load_job(None, {"manifest": str(manifest), "output": str(output), "model": model, "shard_size": 10},
                   [f"device={device}", f"low_vram={low_vram}", "width=64", "height=64", "report=false"])
    prepared = prepare(job)
    resolved = prepared.job
    ledger = Ledger(open_storage(job.output))
    ledger.claim_output(job_record(resolved), job.overwrite)
    plan = make_plan(prepared.manifest, ledger.committed(), job.shard_size, resolved.variant)
    runner = ShardRunner(resolved.worker_settings(resolved.variant))
    for shard in plan.todo:
        runner.run_shard(shard)
    metadata = pa.concat_tables(pq.read_table(p) for p in sorted((output / "metadata").glob("*.parquet")))
    rows = metadata.to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(f"row-{i:03d}" for i in range(40)), "not every row exactly once"
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"]
    print(f"low_vram={low_vram}: {len(plan.todo)} shards, 40 rows ok, batch size {runner.batch_size}, "
          f"engine low_vram={runner.engine.low_vram}, swaps={runner.engine.swaps}, dtype {runner.engine.dtype}")
    return {r["id"]: np.asarray(Image.open(io.BytesIO((output / r["image"]).read_bytes())).convert("RGB")) for r in rows}


def reference_row(pipe, prompt: str, seed: int) -> np.ndarray:
    from zimage_batch.model.variants import get_variant

    steps = get_variant("turbo").num_inference_steps  # the job's default, as the rows have no steps
    image = pipe(prompt=prompt, height=64, width=64, num_inference_steps=steps, guidance_scale=0.0, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return (image * 255).round().astype(np.uint8)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from zimage_batch.generate.engine import default_dtype, load_pipeline
    from zimage_batch.model.tiny import make_tiny_model
    from zimage_batch.model.variants import get_variant

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = str(make_tiny_model(root / "model", "turbo"))
        rows = [{"id": f"row-{i:03d}", "prompt": f"{PROMPTS[i % 4]} {i}", "seed": 1000 + i} for i in range(40)]
        pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
        images = {mode: run_job_in_process(model, root / "manifest.parquet", root / f"out-{mode}", args.device, mode)
                  for mode in ("off", "on")}
        between = max(max_diff(images["off"][k], images["on"][k]) for k in images["off"])
        print(f"low_vram on vs off, all 40 rows: max |diff| {between}/255")
        pipe = load_pipeline(model, get_variant("turbo"), args.device, default_dtype(args.device))
        worst = max(max_diff(images["off"][r["id"]], reference_row(pipe, r["prompt"], r["seed"])) for r in rows[:8])
        print(f"worker (batched) vs ZImagePipeline row by row, 8 rows: max |diff| {worst}/255")


if __name__ == "__main__":
    main()
