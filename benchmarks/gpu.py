"""GPU benchmark: full-size Z-Image-Turbo with random weights, engine vs diffusers, side by side.

    python benchmarks/gpu.py --json gpu.json       # on a CUDA machine: every section below
    python benchmarks/gpu.py --tiny                # the same code on CPU with the tiny model (CI)

Builds the real architecture directly on the device with random weights (6.15B-parameter DiT,
Qwen3-4B text encoder, Flux VAE; nothing is downloaded), then, in one process:
  parity     pixels of the engine (batch 4, prompts padded to the longest or to 512; and row
             by row) and of ZImagePipeline called with the batch, against ZImagePipeline per row
  invariance which part rounds differently when batched (text encoder, transformer, VAE)
  speed      s/img end to end (prompt encoding, denoising, VAE decode) at 1024x1024, 8 NFE,
             batch 1/2/4, diffusers' ZImagePipeline and the engine, peak memory, transformer MFU
  attention  the engine at the largest batch with other attention backends
  low_vram   the low-VRAM profile under a 15 GiB cap on the allocator (a 16 GB card)
  compile    the engine with regional torch.compile (and the fastest attention backend)
MFU is against the bf16 matrix rate measured at the start (8192^3 products), not a datasheet.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

PROMPTS = [
    "a photo of an old fisherman mending a net at dawn, 85mm, film grain",
    "一只戴着围巾的柴犬在雪地里奔跑，高清摄影",
    "a minimalist poster with the words \"ZIMAGE BATCH\" in bold red letters",
    "a glass terrarium with a tiny city inside, macro photography",
]


def full_size_pipeline(device: str, dtype: torch.dtype):
    """ZImagePipeline with the released architecture and random weights, built on `device`."""
    import tempfile
    from pathlib import Path

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from zimage_batch.model.tiny import build_tokenizer

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

    from zimage_batch.model.sources import resolve_model

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


def matmul_rate() -> float:
    """bf16 FLOP/s of large matrix products on this GPU: the ceiling MFU is measured against."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - started)


def transformer_flops_per_image(pipe, size: int, nfe: int, caption_tokens: int = 64) -> float:
    """2 x params x tokens for the matmuls plus the attention score/value products, per NFE."""
    t = pipe.transformer
    params = sum(p.numel() for p in t.parameters())
    tokens = (size // 16) ** 2 + caption_tokens
    layers = t.config.n_layers + 2 * t.config.n_refiner_layers
    attention = 4 * layers * tokens * tokens * t.config.dim
    return nfe * (2 * params * tokens + attention)


def to_uint8(images) -> list[np.ndarray]:
    return [(image * 255).round().astype(np.uint8) for image in images]


class Bench:
    """The pipeline, the engine and the settings shared by every section."""

    def __init__(self, args) -> None:
        from zimage_batch.generate.engine import Engine

        self.args = args
        if args.tiny:
            self.device, self.dtype, self.size = "cpu", torch.float32, args.size or 64
            self.pipe = tiny_pipeline()
        else:
            if not torch.cuda.is_available():
                raise SystemExit("no CUDA device: run with --tiny on CPU")
            self.device, self.dtype, self.size = "cuda", torch.bfloat16, args.size or 1024
            started = time.perf_counter()
            self.pipe = full_size_pipeline(self.device, self.dtype)
            _sync(self.device)
            print(f"built the pipeline on the GPU in {time.perf_counter() - started:.1f}s", flush=True)
        self.engine = Engine(None, "turbo", device=self.device, dtype=self.dtype, pipe=self.pipe)
        self.batches = [int(b) for b in args.batches.split(",")]
        # diffusers' ZImagePipeline (>= 0.39) and the engine run the transformer once per step.
        self.flops = transformer_flops_per_image(self.pipe, self.size, args.steps)
        self.peak = matmul_rate() if self.device == "cuda" else None
        self.results: dict = {"device": self.device_name(), "size": self.size, "steps": args.steps,
                              "dtype": str(self.dtype), "matmul_tflops": self.peak and self.peak / 1e12}

    def device_name(self) -> str:
        return torch.cuda.get_device_name() if self.device == "cuda" else "cpu"

    def requests(self, batch: int, offset: int = 0, distinct: bool = False):
        """`batch` rows (seeds offset, offset+1, ...); with `distinct`, no two share a prompt."""
        from zimage_batch.generate.requests import GenerationRequest

        def prompt(i: int) -> str:
            return PROMPTS[i % len(PROMPTS)] + (f", take {i}" if distinct else "")

        return [GenerationRequest(prompt(offset + i), offset + i, self.size, self.size, self.args.steps, 0.0)
                for i in range(batch)]

    def reference(self, requests) -> list[np.ndarray]:
        out = self.pipe(prompt=[r.prompt for r in requests], height=self.size, width=self.size,
                        num_inference_steps=self.args.steps, guidance_scale=0.0, output_type="np",
                        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests])
        return to_uint8(out.images)

    def time_engine(self, engine, batch: int, repeats: int | None = None) -> float:
        requests = self.requests(batch)
        return time_per_image(lambda: engine.generate(requests, batch_size=batch), batch, self.device,
                              repeats or self.args.repeats)

    def mfu(self, seconds_per_image: float) -> str:
        return f"{self.flops / seconds_per_image / self.peak:.0%}" if self.peak else "n/a"

    def reset_peak(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if self.device == "cuda" else float("nan")

    # ------------------------------------------------------------------ sections
    def parity(self) -> None:
        """Max and mean |difference| (of 255) against ZImagePipeline called one row at a time."""
        rows = self.requests(4)
        per_row = self.per_row = [self.reference([r])[0] for r in rows]
        candidates = {"diffusers, batch of 4": self.reference(rows)}
        engine = self.engine
        saved = engine.pad_prompts_to_max
        for pad in (False, True):
            engine.pad_prompts_to_max = pad
            candidates[f"engine, batch of 4, prompts padded to {'512' if pad else 'the longest'}"] = engine.generate(
                rows, batch_size=4)
        engine.pad_prompts_to_max = saved
        candidates["engine, one row at a time"] = [engine.generate([r])[0] for r in rows]
        print("parity against ZImagePipeline one row at a time | max |diff| | mean |diff|")
        table = {}
        for name, images in candidates.items():
            diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(images, per_row)]
            table[name] = {"max": int(max(d.max() for d in diffs)), "mean": float(np.mean([d.mean() for d in diffs]))}
            print(f"  {name:58s} | {table[name]['max']:3d}/255 | {table[name]['mean']:.3f}")
        self.results["parity"] = table

    def invariance(self) -> None:
        """Which part rounds differently in a batch: row 0 alone against row 0 in a batch of 4,
        part by part (relative max difference)."""
        e, tr, vae = self.engine, self.pipe.transformer, self.pipe.vae
        rows = self.requests(4)
        texts = [e._template(r.prompt) for r in rows]
        rel = lambda a, b: float((a.float() - b.float()).abs().max() / a.float().abs().max())  # noqa: E731
        with torch.inference_mode():
            table = {"text encoder (padded to 512)": rel(e._run_text_encoder(texts[:1], True)[0],
                                                         e._run_text_encoder(texts, True)[0])}
            captions = [e._run_text_encoder([t], True)[0] for t in texts]
            g = torch.Generator("cpu").manual_seed(0)
            side = self.size // 8
            latents = torch.randn(4, 16, 1, side, side, generator=g).to(self.device, self.dtype)
            t = torch.full((4,), 0.5, device=self.device)
            table["transformer (one step)"] = rel(tr([latents[0]], t[:1], captions[:1], return_dict=False)[0][0],
                                                  tr(list(latents.unbind(0)), t, captions, return_dict=False)[0][0])
            z = torch.randn(4, 16, side, side, generator=g).to(self.device, self.dtype)
            table["VAE decode"] = rel(vae.decode(z[:1]).sample[0], vae.decode(z).sample[0])
        print("row 0 alone vs in a batch of 4 | relative max difference")
        for name, value in table.items():
            print(f"  {name:30s} | {value:.2e}", flush=True)
        self.results["invariance"] = table

    def speed(self) -> None:
        print("batch | diffusers s/img | engine s/img | speed-up | peak GiB | transformer MFU")
        table = []
        for batch in self.batches:
            requests = self.requests(batch)
            self.reset_peak()
            ref_s = time_per_image(lambda: self.reference(requests), batch, self.device, self.args.repeats)
            eng_s = self.time_engine(self.engine, batch)
            peak = self.peak_gib()
            table.append({"batch": batch, "diffusers_s": ref_s, "engine_s": eng_s, "peak_gib": peak})
            print(f"{batch:5d} | {ref_s:15.3f} | {eng_s:12.3f} | {ref_s / eng_s:7.2f}x | {peak:8.1f} | {self.mfu(eng_s)}",
                  flush=True)
        self.results["speed"] = table

    def attention(self) -> None:
        batch, table = max(self.batches), {}
        print(f"attention backend (engine, batch {batch}) | s/img | transformer MFU")
        for backend in self.args.attention_backends.split(","):
            try:
                self.pipe.transformer.set_attention_backend(backend)
                table[backend] = seconds = self.time_engine(self.engine, batch, repeats=1)
                print(f"  {backend:38s} | {seconds:.3f} | {self.mfu(seconds)}", flush=True)
            except Exception as exc:  # a backend this machine lacks
                table[backend] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                print(f"  {backend:38s} | {table[backend]}", flush=True)
        self.pipe.transformer.set_attention_backend("native")
        self.results["attention"] = table
        timed = {k: v for k, v in table.items() if isinstance(v, float)}
        self.best_backend = min(timed, key=timed.get) if timed else "native"

    def low_vram(self) -> None:
        """A shard of 8 rows as the worker runs it: encode ahead, then denoise batch by batch."""
        from zimage_batch.generate.engine import Engine

        cap = self.args.low_vram_gib
        engine = Engine(None, "turbo", device=self.device, dtype=self.dtype, pipe=self.pipe, low_vram=True)
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(cap * 2**30 / torch.cuda.get_device_properties(0).total_memory)
        print(f"low_vram (allocator capped at {cap} GiB), shard of 8 rows | s/img denoising from the cache | "
              "encode ahead (text encoder in) | transformer back in | peak GiB")
        table = []
        try:
            for batch in (int(b) for b in self.args.low_vram_batches.split(",")):
                rows = self.requests(8, offset=100 * batch, distinct=True)
                warm = self.requests(batch, offset=100 * batch + 50, distinct=True)
                engine.encode_ahead(warm)  # warm-up at this batch size
                engine.generate(warm, batch_size=batch)
                engine.release_prompts(warm)
                self.reset_peak()
                marks = [time.perf_counter()]
                for step in (lambda: engine.encode_ahead(rows, batch_size=8), lambda: engine._bring("transformer"),
                             lambda: engine.generate(rows, batch_size=batch)):
                    step()
                    _sync(self.device)
                    marks.append(time.perf_counter())
                engine.release_prompts(rows)
                encode, bring, generate = (b - a for a, b in zip(marks, marks[1:]))
                row = {"batch": batch, "s_per_img": generate / len(rows), "encode_ahead_s": encode,
                       "transformer_in_s": bring, "peak_gib": self.peak_gib()}
                table.append(row)
                print(f"  batch {batch} | {row['s_per_img']:.3f} | {encode:.2f}s | {bring:.2f}s | {row['peak_gib']:.1f}",
                      flush=True)
        except torch.OutOfMemoryError as exc:
            table.append({"failed": f"out of memory: {str(exc).splitlines()[0][:200]}"})
            print(f"  out of memory under the cap: {str(exc).splitlines()[0][:200]}", flush=True)
        finally:
            if self.device == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0)
            self.pipe.text_encoder.to(self.device)
            self.pipe.transformer.to(self.device)
        self.results["low_vram"] = table

    def compiled(self) -> None:
        if self.device != "cuda":
            print("compile: CUDA only, skipped")
            return
        backend = getattr(self, "best_backend", "native")
        self.pipe.transformer.set_attention_backend(backend)
        started = time.perf_counter()
        self.pipe.transformer.compile_repeated_blocks(fullgraph=False)
        print(f"compiled (regional), attention {backend} | batch | engine s/img | diffusers-loop s/img ÷ this | MFU")
        loop = next((r["diffusers_s"] for r in self.results.get("speed", []) if r["batch"] == 1), None)
        table = []
        for batch in self.batches:
            seconds = self.time_engine(self.engine, batch)
            table.append({"batch": batch, "engine_s": seconds})
            ratio = f"{loop / seconds:.2f}x" if loop else "n/a"
            print(f"  {batch:5d} | {seconds:.3f} | {ratio} | {self.mfu(seconds)}", flush=True)
        self.results["compile"] = {"backend": backend, "wall_s_incl_compile": time.perf_counter() - started,
                                   "table": table}
        if hasattr(self, "per_row"):  # the compiled engine still draws the reference's pixels
            images = self.engine.generate(self.requests(4), batch_size=4)
            worst = max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in zip(images, self.per_row))
            self.results["compile"]["parity_max_diff"] = worst
            print(f"  compiled engine, batch of 4, against ZImagePipeline per row: max |diff| {worst}/255")


SECTIONS = ("parity", "invariance", "speed", "attention", "low_vram", "compile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU at 64x64 (keeps this script tested)")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=8,
                        help="steps = transformer passes (Turbo's default 8 NFE; 9 was the 2026-11-27 H200 run)")
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {','.join(SECTIONS)}")
    parser.add_argument("--attention-backends", default="native,_native_cudnn,_native_flash,_native_efficient")
    parser.add_argument("--low-vram-gib", type=float, default=15.0, help="allocator cap for the low_vram section")
    parser.add_argument("--low-vram-batches", default="1,2")
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    args = parser.parse_args()

    bench = Bench(args)
    params = sum(p.numel() for p in bench.pipe.transformer.parameters()) / 1e9
    print(f"device {bench.device_name()}, transformer {params:.2f}B params, {bench.size}x{bench.size}, "
          f"{args.steps} steps, {bench.dtype}, bf16 matmul {bench.results['matmul_tflops'] or 0:.0f} TFLOP/s", flush=True)
    for section in args.sections.split(","):
        started = time.perf_counter()
        try:
            {"parity": bench.parity, "invariance": bench.invariance, "speed": bench.speed, "attention": bench.attention,
             "low_vram": bench.low_vram, "compile": bench.compiled}[section]()
        except Exception as exc:  # one broken section must not lose the others' figures
            bench.results[section] = f"failed: {type(exc).__name__}: {exc}"
            print(f"{section} failed: {type(exc).__name__}: {exc}", flush=True)
        print(f"({section}: {time.perf_counter() - started:.0f}s)", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(bench.results, f, indent=1)


if __name__ == "__main__":
    main()
