"""What scoring images on the worker costs (issue 27), two ways:

    python benchmarks/curation.py                  # 16 rows, tiny model and tiny scorers, 64x64, 8 steps
    python benchmarks/curation.py --rows 4         # a smoke run
    python benchmarks/curation.py --flops-only     # only the full-size FLOP counts (no model runs)

1. Measured on the tiny models: one job with scores [clip, aesthetic, nsfw] runs through the
   worker's own path (ShardRunner: batches, scoring on the model thread before encoding, commit),
   in-process, model loading not counted; the share is scoring time over the shards' model time
   (generation + scoring). Tiny random scorers are about as large as the tiny generator, so this
   share says little about full size; it shows the scoring path runs batched and inline.
2. Counted at full size: FLOPs of one image's scoring (CLIP ViT-L/14 text + image towers, the
   aesthetic head, a ViT-base/16 NSFW classifier, counted by torch's FlopCounterMode on the meta
   device: no memory, no weights) against one Z-Image-Turbo 1024x1024 image at 8 NFE (the 6.15B
   transformer counted as 2 x parameters x tokens plus attention, 4096 image + TEXT_TOKENS text
   tokens per step; text encoder and VAE left out, which makes the share look larger, not smaller).
   Goal: scoring <= 3% of generation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zimage_batch.curate.tiny import make_tiny_scorer  # noqa: E402
from zimage_batch.jobspec import load_job  # noqa: E402
from zimage_batch.output.ledger import Ledger  # noqa: E402
from zimage_batch.run.plan import make_plan  # noqa: E402
from zimage_batch.run.preflight import job_record, prepare  # noqa: E402
from zimage_batch.run.worker import ShardRunner  # noqa: E402
from zimage_batch.storage import open_storage  # noqa: E402

TEXT_TOKENS = 128  # caption tokens per step (prompts of a few sentences)
NFE = 8
SIDE = 1024


def measured_share(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="curation-bench-") as tmp:
        root = Path(tmp)
        sources = {kind: make_tiny_scorer(root / kind, kind) for kind in ("clip", "nsfw")}
        sources["aesthetic"] = make_tiny_scorer(root, "aesthetic")
        pq.write_table(pa.table({"id": [f"b{i:04d}" for i in range(args.rows)],
                                 "prompt": [f"a watercolor fox, study {i}" for i in range(args.rows)],
                                 "seed": list(range(args.rows))}), root / "m.parquet")
        settings = [f"width={args.size}", f"height={args.size}", f"num_inference_steps={args.steps}", "report=false",
                    "scores=clip,aesthetic,nsfw", *[f"scorers.{k}={v}" for k, v in sources.items()]]
        job = load_job(None, {"manifest": str(root / "m.parquet"), "output": str(root / "out"), "model": "tiny:turbo",
                              "batch_size": args.batch_size, "shard_size": args.shard_size}, settings)
        prepared = prepare(job)
        runner = ShardRunner(prepared.job.worker_settings(prepared.job.variant), threads=args.threads)
        Ledger(open_storage(job.output)).claim_output(job_record(prepared.job, prepared.model), overwrite=False)
        scoring_before, model_s = runner.scorers.seconds, 0.0
        started = time.perf_counter()
        for shard in make_plan(prepared.manifest, {}, job.shard_size, prepared.job.variant).todo:
            marker = runner.run_shard(shard)
            model_s += marker.busy_s
        wall = time.perf_counter() - started
        scoring = runner.scorers.seconds - scoring_before
    print(f"tiny, measured: {args.rows} images at {args.size}x{args.size}, {args.steps} steps, batch {args.batch_size}: "
          f"model time {model_s:.2f} s (wall {wall:.2f} s), scoring {scoring:.2f} s = {scoring / model_s:.1%} "
          f"of model time, {scoring / args.rows * 1000:.1f} ms an image")


def scoring_flops() -> dict[str, float]:
    """FLOPs of one image's scores at full size, by torch's FlopCounterMode on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTForImageClassification

    clip_config = CLIPConfig(  # openai/clip-vit-large-patch14
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14), projection_dim=768)
    with torch.device("meta"):
        clip, nsfw = CLIPModel(clip_config), ViTForImageClassification(ViTConfig(num_labels=2))  # ViT-base/16 at 224
        ids, pixels = torch.zeros(1, 77, dtype=torch.long), torch.zeros(1, 3, 224, 224)
        flops = {}
        for name, call in (("clip (text + image)", lambda: clip(input_ids=ids, pixel_values=pixels)),
                           ("nsfw (ViT-base/16)", lambda: nsfw(pixel_values=pixels))):
            with FlopCounterMode(display=False) as counter:
                call()
            flops[name] = float(counter.get_total_flops())
    widths = (768, 1024, 128, 64, 16, 1)  # the LAION improved aesthetic predictor
    flops["aesthetic head"] = float(sum(2 * a * b for a, b in zip(widths, widths[1:])))
    return flops


def generation_flops() -> tuple[float, int]:
    """FLOPs of one Z-Image-Turbo image at SIDE x SIDE and NFE steps (transformer only)."""
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        transformer = ZImageTransformer2DModel()  # the released 6.15B configuration
    params = sum(p.numel() for p in transformer.parameters())
    config = transformer.config
    tokens = (SIDE // 8 // config.all_patch_size[0]) ** 2 + TEXT_TOKENS
    per_step = 2 * params * tokens + 4 * config.n_layers * config.dim * tokens**2
    return float(per_step * NFE), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models gain nothing from more)")
    parser.add_argument("--flops-only", action="store_true")
    args = parser.parse_args()
    if not args.flops_only:
        measured_share(args)
    scoring = scoring_flops()
    generation, params = generation_flops()
    total = sum(scoring.values())
    print(f"full size, counted: one Z-Image-Turbo {SIDE}x{SIDE} image at {NFE} NFE ({params / 1e9:.2f}B transformer, "
          f"{TEXT_TOKENS} text tokens) = {generation / 1e12:.0f} TFLOP")
    for name, value in scoring.items():
        print(f"  {name:22s} {value / 1e12:8.4f} TFLOP = {value / generation:.4%} of generation")
    print(f"  all three scores       {total / 1e12:8.4f} TFLOP = {total / generation:.4%} of generation (goal <= 3%)")


if __name__ == "__main__":
    main()
