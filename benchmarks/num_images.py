"""Several images per prompt: images/s at num_images=4 against num_images=1 on the same prompts.

    python benchmarks/num_images.py                  # 64 prompts, tiny:turbo, 64x64, 8 steps
    python benchmarks/num_images.py --device cuda --model DIR --size 1024

One run, both jobs side by side through the worker (`ShardRunner`, no Ray: rows expanded to
images, batches, the text encoder, denoising, PNG encoding, storage, metadata and commit), the
same prompts and job seed. A row's images share one text-encoder pass, so at num_images=4 the
text encoder runs once per 4 images instead of once per image: the ratio of the two jobs'
images/s is that saving (on the tiny model the text encoder is a small share of an image; on
Z-Image-Turbo it is Qwen3-4B, about 10% of an image on a GPU). Each job runs `--repeats` times,
alternating, and medians are compared. Printed: images/s over generation time (model time of
the shards) and over the whole run_shard calls, prompts the text encoder saw, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PROMPTS = ["a photo of a cat", "一只可爱的小猫坐在窗台上", "a watercolor of mountains at dawn, very detailed, soft light",
           "a red vintage car parked by the sea"]


def run_job(model: str, manifest: Path, output: Path, num_images: int, args) -> dict:
    """Plan the job as `zimage-batch run` does and run every shard through one ShardRunner."""
    from zimage_batch.jobspec import load_job
    from zimage_batch.output.ledger import Ledger
    from zimage_batch.run.plan import make_plan
    from zimage_batch.run.preflight import job_record, prepare
    from zimage_batch.run.worker import ShardRunner
    from zimage_batch.storage import open_storage

    settings = [f"num_images={num_images}", f"width={args.size}", f"height={args.size}",
                f"num_inference_steps={args.steps}", f"device={args.device}", "report=false"]
    shard_size = max(1, args.images_per_shard // num_images)  # the same batches of images either way
    job = load_job(None, {"manifest": str(manifest), "output": str(output), "model": model,
                          "shard_size": shard_size}, settings)
    prepared = prepare(job)
    resolved = prepared.job
    Ledger(open_storage(job.output)).claim_output(job_record(resolved, prepared.model), False)
    plan = make_plan(prepared.manifest, {}, job.shard_size, resolved.variant)
    runner = ShardRunner(resolved.worker_settings(resolved.variant))
    encoder = _timed(runner.engine.pipe.text_encoder)
    started = time.perf_counter()
    markers = [runner.run_shard(shard) for shard in plan.todo]
    wall = time.perf_counter() - started
    images = sum(m.ok for m in markers)
    assert images == args.prompts * num_images and not sum(m.error for m in markers)
    return {"images": images, "generation_s": sum(m.busy_s for m in markers), "wall_s": wall,
            "prompts_encoded": runner.engine.prompts.encoded, "text_encoder_s": encoder["seconds"]}


def _timed(module) -> dict:
    """Seconds `module`'s forward passes take, measured with forward hooks (the model is untouched)."""
    clock = {"seconds": 0.0, "start": 0.0}
    module.register_forward_pre_hook(lambda *_: clock.update(start=time.perf_counter()))
    module.register_forward_hook(lambda *_: clock.update(seconds=clock["seconds"] + time.perf_counter() - clock["start"]))
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--model", default="tiny:turbo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--images-per-shard", type=int, default=64, help="shards hold this many images at either setting")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    results: dict[int, list[dict]] = {1: [], 4: []}
    with tempfile.TemporaryDirectory(prefix="zimage-num-images-") as tmp:
        manifest = Path(tmp) / "prompts.parquet"
        rows = [{"id": f"p{i:04d}", "prompt": f"{PROMPTS[i % len(PROMPTS)]}, variation {i}"} for i in range(args.prompts)]
        pq.write_table(pa.Table.from_pylist(rows), manifest)
        print(f"{args.prompts} prompts, {args.model}, {args.size}x{args.size}, {args.steps} steps, {args.device}, "
              f"{args.repeats} repeats", flush=True)
        for repeat in range(args.repeats):
            for n in (1, 4):
                r = run_job(args.model, manifest, Path(tmp) / f"out-{n}-{repeat}", n, args)
                results[n].append(r)
                print(f"  num_images={n}: {r['images']} images, {r['images'] / r['generation_s']:.1f} img/s over "
                      f"generation, {r['images'] / r['wall_s']:.1f} img/s over run_shard, text encoder: "
                      f"{r['prompts_encoded']} prompts, {1000 * r['text_encoder_s'] / r['images']:.2f} ms an image",
                      flush=True)
    gen = {n: statistics.median(r["images"] / r["generation_s"] for r in rs) for n, rs in results.items()}
    text = {n: statistics.median(1000 * r["text_encoder_s"] / r["images"] for r in rs) for n, rs in results.items()}
    wall = {n: statistics.median(r["images"] / r["wall_s"] for r in rs) for n, rs in results.items()}
    print(f"num_images=1: {gen[1]:.1f} img/s over generation, {wall[1]:.1f} img/s over run_shard "
          f"({results[1][0]['prompts_encoded']} prompts encoded for {results[1][0]['images']} images, "
          f"text encoder {text[1]:.2f} ms an image)")
    print(f"num_images=4: {gen[4]:.1f} img/s over generation, {wall[4]:.1f} img/s over run_shard "
          f"({results[4][0]['prompts_encoded']} prompts encoded for {results[4][0]['images']} images, "
          f"text encoder {text[4]:.2f} ms an image)")
    print(f"ratio num_images 4 / 1: {gen[4] / gen[1]:.2f}x over generation, {wall[4] / wall[1]:.2f}x over run_shard")


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main()
