"""GPU benchmark: full-size Z-Image-Turbo with random weights, engine vs diffusers, side by side.

    python benchmarks/gpu.py                       # on a CUDA machine: 1024x1024, 8 NFE, batch 1/2/4
    python benchmarks/gpu.py --compile --attention-backend flash
    python benchmarks/gpu.py --tiny                # the same code path on CPU with the tiny model (CI)

Builds the real architecture directly on the device with random weights (6.15B-parameter DiT,
Qwen3-4B text encoder, Flux VAE; nothing is downloaded), then measures seconds per image end
to end (prompt encoding, denoising, VAE decode) for diffusers' ZImagePipeline called per batch
and for the zimage-batch engine, at each batch size, in the same process. Prints peak memory
and model-FLOP utilisation of the transformer.
"""

from __future__ import annotations

import argparse
import time

import torch

PROMPTS = [
    "a photo of an old fisherman mending a net at dawn, 85mm, film grain",
    "一只戴着围巾的柴犬在雪地里奔跑，高清摄影",
    "a minimalist poster with the words \"ZIMAGE BATCH\" in bold red letters",
    "a glass terrarium with a tiny city inside, macro photography",
]
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def full_size_pipeline(device: str, dtype: torch.dtype):
    """ZImagePipeline with the released architecture and random weights, built on `device`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from zimage_batch.tiny import build_tokenizer

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        build_tokenizer(Path(tmp))  # a local tokenizer: token ids stay within Qwen's vocabulary
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tmp)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = ZImageTransformer2DModel()  # defaults are the released 6.15B configuration
            text_encoder = Qwen3Model(Qwen3Config(
                vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1_000_000, rms_norm_eps=1e-6, tie_word_embeddings=True,
            ))
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, sample_size=1024,
            )
    finally:
        torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def tiny_pipeline():
    from diffusers import ZImagePipeline

    from zimage_batch.sources import resolve_model

    pipe = ZImagePipeline.from_pretrained(resolve_model("tiny:turbo").path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_per_image(fn, batch: int, device: str, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - started) / (repeats * batch)


def transformer_flops_per_image(pipe, size: int, nfe: int, caption_tokens: int = 128) -> float:
    """2 x params x tokens for the matmuls plus the attention score/value products, per NFE."""
    t = pipe.transformer
    params = sum(p.numel() for p in t.parameters())
    tokens = (size // 16) ** 2 + caption_tokens
    layers = t.config.n_layers + 2 * t.config.n_refiner_layers
    attention = 4 * layers * tokens * tokens * t.config.dim
    return nfe * (2 * params * tokens + attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU at 64x64 (keeps this script tested)")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=9, help="scheduler steps (9 = 8 NFE for Turbo)")
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer (CUDA)")
    parser.add_argument("--attention-backend", default=None, help="e.g. flash, _flash_3, native (CUDA)")
    args = parser.parse_args()

    from zimage_batch.engine import Engine, GenerationRequest

    if args.tiny:
        device, dtype, size = "cpu", torch.float32, args.size or 64
        pipe = tiny_pipeline()
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny on CPU")
        device, dtype, size = "cuda", torch.bfloat16, args.size or 1024
        pipe = full_size_pipeline(device, dtype)
    params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e9
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), transformer {params:.2f}B "
          f"params, {size}x{size}, {args.steps} steps, {dtype}")

    engine = Engine(None, "turbo", device=device, dtype=dtype, pipe=pipe,
                    attention_backend=args.attention_backend, compile=args.compile)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if device == "cuda" and k in torch.cuda.get_device_name()), None)
    flops = transformer_flops_per_image(pipe, size, args.steps - 1)
    print("batch | diffusers s/img | engine s/img | speed-up | peak GiB | transformer MFU")
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]

        def reference() -> None:
            pipe(prompt=prompts, height=size, width=size, num_inference_steps=args.steps, guidance_scale=0.0,
                 generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)], output_type="np")

        requests = [GenerationRequest(p, i, size, size, args.steps, 0.0) for i, p in enumerate(prompts)]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ref_s = time_per_image(reference, batch, device, args.repeats)
        eng_s = time_per_image(lambda: engine.generate(requests, batch_size=batch), batch, device, args.repeats)
        peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        mfu = f"{flops / eng_s / peak:.0%}" if peak else "n/a"
        print(f"{batch:5d} | {ref_s:15.3f} | {eng_s:12.3f} | {ref_s / eng_s:7.2f}x | {peak_gib:8.1f} | {mfu}")


if __name__ == "__main__":
    main()
