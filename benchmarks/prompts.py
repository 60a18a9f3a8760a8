"""What prompt expansion costs (issue 29), two ways.

    python benchmarks/prompts.py                         # 16 rows, tiny models, 64x64, 8 steps, 100 new tokens
    python benchmarks/prompts.py --rows 2 --new-tokens 4 # a smoke run

(a) Measured, on the tiny models: one job's shard through the worker's own path (ShardRunner:
    the shard's distinct prompts expanded on the model thread, then batches drawn, images encoded
    and stored, the shard committed), in-process, model loading not counted. The share is the
    time spent expanding over the worker's model time (expanding plus drawing). The tiny LM is
    random and never stops early, so every prompt gets all `--new-tokens` tokens.

(b) Counted, at full size (the configurations built on the meta device, no memory): the FLOPs
    of expanding one prompt with the default model (Qwen3-4B-Instruct-2507: prefill of the
    instructions and the prompt, then `--new-tokens` tokens, each attending to all before it)
    against those of one Z-Image-Turbo image at 1024x1024 and 8 NFE (transformer and text
    encoder; the VAE decode is left out, so the share is an upper bound). Decoding is bound by
    memory bandwidth, not FLOPs, on a GPU: the line after it gives the bandwidth floor too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from zimage_batch.generate.expansion import DEFAULT_INSTRUCTIONS  # noqa: E402
from zimage_batch.jobspec import load_job  # noqa: E402
from zimage_batch.model.prompt_model import make_tiny_prompt_model  # noqa: E402
from zimage_batch.output.ledger import Ledger  # noqa: E402
from zimage_batch.run.plan import make_plan  # noqa: E402
from zimage_batch.run.preflight import job_record, prepare  # noqa: E402
from zimage_batch.run.worker import ShardRunner  # noqa: E402
from zimage_batch.storage import open_storage  # noqa: E402

# Qwen3-4B-Instruct-2507's configuration (its config.json): the text encoder's, with an LM head
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
H200_BANDWIDTH = 4.8e12  # bytes/s of HBM3e
TOKENS_PER_CHAR = 0.25  # English text through Qwen's tokenizer, about 4 characters a token


def measured_share(args) -> None:
    with tempfile.TemporaryDirectory(prefix="prompts-bench-") as tmp:
        root = Path(tmp)
        lm = make_tiny_prompt_model(str(root / "lm"))
        pq.write_table(pa.table({"id": [f"p{i:04d}" for i in range(args.rows)],
                                 "prompt": [f"a red fox in the snow, study {i}" for i in range(args.rows)],
                                 "seed": list(range(args.rows))}), root / "m.parquet")
        job = load_job(None, {"manifest": str(root / "m.parquet"), "output": str(root / "out"), "model": "tiny:turbo",
                              "batch_size": args.batch_size, "shard_size": args.rows},
                       [f"prompt_expansion={lm}", f"max_new_tokens={args.new_tokens}", f"num_inference_steps={args.steps}",
                        f"width={args.size}", f"height={args.size}", "report=false"])
        prepared = prepare(job)
        resolved = prepared.job
        Ledger(open_storage(job.output)).claim_output(job_record(resolved, prepared.model), overwrite=False)
        runner = ShardRunner(resolved.worker_settings(resolved.variant), threads=args.threads)
        started = time.perf_counter()
        for shard in make_plan(prepared.manifest, {}, job.shard_size, resolved.variant).todo:
            runner.run_shard(shard)
        wall = time.perf_counter() - started
        expanding, drawing = runner.expansion_s, runner.engine.busy_seconds
    print(f"(a) tiny models: {args.rows} rows, {args.size}x{args.size}, {args.steps} steps, batch {args.batch_size}, "
          f"{args.new_tokens} new tokens: expanding {expanding:.2f} s, drawing {drawing:.2f} s, shard {wall:.2f} s; "
          f"expansion is {expanding / (expanding + drawing):.0%} of the worker's model time")


def full_size_flops(args) -> None:
    import gpu
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        lm = Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B))
    lm_params = sum(p.numel() for p in lm.parameters())  # the tied embedding counted once: the LM head's matmul
    attention_width = QWEN3_4B["num_attention_heads"] * QWEN3_4B["head_dim"]
    layers = QWEN3_4B["num_hidden_layers"]
    prefill = int((len(DEFAULT_INSTRUCTIONS) + args.prompt_chars) * TOKENS_PER_CHAR) + 20  # + the chat template
    new = args.new_tokens
    # every position: 2 x params for the matmuls, 4 x context x width per layer for scores and values
    positions = range(1, prefill + new + 1)
    expansion = sum(2 * lm_params + 4 * layers * ctx * attention_width for ctx in positions)
    pipe = gpu.full_size_pipeline("meta", torch.bfloat16)
    encoder_params = sum(p.numel() for p in pipe.text_encoder.parameters())
    caption = int(args.prompt_chars * TOKENS_PER_CHAR) + new  # the expanded prompt is the caption
    image = gpu.transformer_flops_per_image(pipe, 1024, 8, caption_tokens=caption) + 2 * encoder_params * caption
    short = gpu.transformer_flops_per_image(pipe, 1024, 8, caption_tokens=int(args.prompt_chars * TOKENS_PER_CHAR))
    print(f"(b) full size: expanding one prompt ({prefill} prompt tokens + {new} new, {lm_params / 1e9:.2f}B "
          f"parameters) is {expansion / 1e12:.2f} TFLOP; one Turbo image at 1024x1024, 8 NFE, with that caption, "
          f"{image / 1e12:.0f} TFLOP: expansion is {expansion / (image + expansion):.2%} of the FLOPs "
          f"(the longer caption adds {(image - short) / short:.1%} to the image's own)")
    weights = lm_params * 2  # bf16 bytes read per decoding step, shared by the prompts of a batch
    floor = new * weights / H200_BANDWIDTH
    print(f"    bandwidth floor on an H200: {new} decoding steps x {weights / 1e9:.1f} GB of weights = {floor:.2f} s "
          f"per batch of prompts ({floor / 16 * 1000:.0f} ms a prompt at the worker's batch of 16)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--prompt-chars", type=int, default=40, help="length of a short prompt, for (b)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models gain nothing from more)")
    args = parser.parse_args()
    measured_share(args)
    full_size_flops(args)


if __name__ == "__main__":
    main()
