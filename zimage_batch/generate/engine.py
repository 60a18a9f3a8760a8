"""The batched generation engine: one loaded Z-Image variant, rows in, pixels out.

It follows diffusers' `ZImagePipeline` step for step (same scheduler, same CFG rule, same
VAE decode) so that its pixels match the reference pipeline for the same row and seed, and
differs only where batching pays: rows sharing a shape and sampler settings run together
(on the CPU, prompts padded only to the longest prompt in the batch), and each row draws its
noise on the CPU from its own seed. In bf16 on CUDA the transformer's kernels round a batch
slightly differently from one row (diffusers' pipeline too: up to 7/255 at batch 4 on an
H200), so there a row's pixels are exact for a given batch size, not across batch sizes.
"""

from __future__ import annotations

import copy
import logging
import time
from itertools import groupby
from typing import Any, Callable, Sequence

import numpy as np
import torch

from zimage_batch.generate.lora import LoraAdapters, use_adapters
from zimage_batch.generate.low_vram import TakingTurns
from zimage_batch.generate.prompts import RecentPrompts
from zimage_batch.generate.requests import GenerationRequest
from zimage_batch.model.variants import Variant, get_variant

log = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512  # the reference pipeline's prompt truncation length
# Below this much GPU memory the bf16 transformer (12.3 GB) and Qwen3-4B (8 GB) take turns.
LOW_VRAM_BELOW = 30 * 2**30


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_pipeline(model_dir: str, variant: Variant, device: str | None, dtype: torch.dtype) -> Any:
    """Load the diffusers reference pipeline of `variant` from a local checkpoint folder
    (onto `device`, or left on the CPU when `device` is None)."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipeline_class = getattr(diffusers, variant.pipeline_class)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = pipeline_class.from_pretrained(model_dir, torch_dtype=dtype, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device else pipe


def low_vram_needed(device: str) -> bool:
    """True when the text encoder and the transformer cannot both stay on the GPU (a 16-24 GB card)."""
    if not str(device).startswith("cuda"):
        return False
    return torch.cuda.get_device_properties(torch.device(device)).total_memory < LOW_VRAM_BELOW


def apply_guidance(pos: torch.Tensor, neg: torch.Tensor, scale: float, settings: GenerationRequest) -> torch.Tensor:
    """Classifier-free guidance with the reference pipeline's optional norm cap."""
    pred = pos + scale * (pos - neg)
    if settings.cfg_normalization and float(settings.cfg_normalization) > 0:
        max_norm = torch.linalg.vector_norm(pos) * float(settings.cfg_normalization)
        new_norm = torch.linalg.vector_norm(pred)
        if new_norm > max_norm:
            pred = pred * (max_norm / new_norm)
    return pred


def reference_generate(pipe: Any, r: GenerationRequest) -> np.ndarray:
    """Variants whose text-to-image path needs extra conditioning go through diffusers as is."""
    out = pipe(
        prompt=r.prompt,
        negative_prompt=r.negative_prompt,
        width=r.width,
        height=r.height,
        num_inference_steps=r.num_inference_steps,
        guidance_scale=r.guidance_scale,
        cfg_truncation=r.cfg_truncation,
        cfg_normalization=r.cfg_normalization,
        generator=torch.Generator("cpu").manual_seed(r.seed),
        output_type="np",
    ).images[0]
    return (out * 255).round().astype(np.uint8)


class Engine:
    """Holds one loaded variant and turns generation requests into uint8 RGB arrays.

    With `low_vram` the text encoder and the transformer take turns on the device: prompts are
    encoded ahead in bulk (`encode_ahead`, once per shard) while the transformer waits on the
    CPU, then the transformer comes back and every batch denoises from the cached embeddings.
    """

    def __init__(
        self,
        model_dir: str | None,
        variant: str = "turbo",
        device: str | None = None,
        dtype: torch.dtype | None = None,
        attention_backend: str | None = None,
        compile: bool = False,
        pipe: Any = None,
        low_vram: bool = False,
        adapters: dict[str, str] | None = None,
    ) -> None:
        """Load the checkpoint in `model_dir`, or use an already built diffusers `pipe`, and the
        LoRA `adapters` (name -> local .safetensors file) requests choose from."""
        self.variant = get_variant(variant)
        self.device = device or default_device()
        self.dtype = dtype or default_dtype(self.device)
        self.on_cuda = str(self.device).startswith("cuda")
        self.low_vram = low_vram
        if pipe is None:
            pipe = load_pipeline(model_dir, self.variant, None if low_vram else self.device, self.dtype)
        self.pipe = pipe
        # Before compiling: PEFT replaces the adapted layers with its own.
        self.adapters = LoraAdapters(pipe, adapters) if adapters else None
        # Prompts are padded like the reference, to 512, on CUDA: in bf16 the text encoder's
        # output then does not depend on the other prompts it runs with (measured on an H200),
        # at ~10 ms a prompt. On the CPU (fp32, exact either way) only to the longest: cheaper.
        self.pad_prompts_to_max = self.on_cuda
        self.turns = TakingTurns(pipe, self.device, offload_all=self.variant.needs_siglip) if low_vram else None
        if self.on_cuda and attention_backend:
            self.pipe.transformer.set_attention_backend(attention_backend)
        if self.on_cuda and compile:
            # Regional compilation: the 34 identical blocks compile once, in seconds, not minutes.
            self.pipe.transformer.compile_repeated_blocks(fullgraph=False)
        self.busy_seconds = 0.0  # wall time spent generating, for the busy fraction
        self.prompts = RecentPrompts()  # each distinct text of a batch encoded once: prompts.encode

    @property
    def swaps(self) -> int:
        """low_vram: how often the text encoder and the transformer traded places."""
        return self.turns.swaps if self.turns else 0

    def _bring(self, name: str) -> None:
        if self.turns:
            self.turns.bring(name)

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest], batch_size: int = 8) -> list[np.ndarray]:
        """Draw every request; returns HxWx3 uint8 arrays in request order."""
        start = time.perf_counter()
        order = sorted(range(len(requests)), key=lambda i: requests[i].batch_key())
        results: list[np.ndarray | None] = [None] * len(requests)
        for _, group in groupby(order, key=lambda i: requests[i].batch_key()):
            indices = list(group)
            for chunk_start in range(0, len(indices), batch_size):
                chunk = indices[chunk_start : chunk_start + batch_size]
                use_adapters(self.adapters, requests[chunk[0]].lora)  # one set per batch
                images = self._generate_splitting_on_oom([requests[i] for i in chunk])
                for i, image in zip(chunk, images):
                    results[i] = image
        self.busy_seconds += time.perf_counter() - start
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ batching
    def _generate_splitting_on_oom(self, batch: list[GenerationRequest]) -> list[np.ndarray]:
        """Run one batch; on CUDA out-of-memory split it in two and retry each half."""
        try:
            return self._generate_batch(batch)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
        # Retried outside the except block: the failed attempt's frames (and the activations
        # they hold) are released with the exception, so the halves get that memory back.
        if self.on_cuda:
            torch.cuda.empty_cache()
        half = len(batch) // 2
        log.warning("out of memory at batch %d; retrying as %d + %d", len(batch), half, len(batch) - half)
        return self._generate_splitting_on_oom(batch[:half]) + self._generate_splitting_on_oom(batch[half:])

    def _generate_batch(self, batch: list[GenerationRequest]) -> list[np.ndarray]:
        """One batch of one batch key (`EditEngine` draws edit requests)."""
        if self.variant.needs_siglip:
            return [reference_generate(self.pipe, r) for r in batch]
        first = batch[0]
        use_cfg = first.guidance_scale > 0
        texts = [r.prompt for r in batch]
        if use_cfg:
            texts += [r.negative_prompt or "" for r in batch]
        embeds = self.prompts.encode(texts, self.encode_prompt)  # each distinct new text once
        positive, negative = embeds[: len(batch)], embeds[len(batch) :]
        latents = self.prepare_latents(batch)
        latents = self.denoise(latents, positive, negative, first)
        return self.decode_latents(latents)

    # ------------------------------------------------------------------ stages
    def encode_prompt(self, texts: list[str]) -> list[torch.Tensor]:
        """Qwen3 hidden_states[-2] per prompt (padded to 512 with `pad_prompts_to_max`, else to
        the longest prompt in the batch)."""
        return self.encode_texts([self._template(text) for text in texts], self.pad_prompts_to_max)

    def _template(self, text: str) -> str:
        return self.pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )

    def encode_texts(self, texts: list[str], pad_to_max: bool = False) -> list[torch.Tensor]:
        """Qwen3 hidden_states[-2] of already templated texts, padded to the longest one
        (or to MAX_SEQUENCE_LENGTH, as the reference pipelines do, with `pad_to_max`).
        With low_vram, texts encoded ahead come from the cache."""
        if not (self.turns and self.turns.active):
            return self._run_text_encoder(texts, pad_to_max)
        return self.turns.lookup([(t, pad_to_max) for t in texts], self._encode_on_device)

    def encode_ahead(self, requests: Sequence[GenerationRequest], batch_size: int = 16) -> None:
        """low_vram: encode these requests' prompts (and negative prompts) now, in one turn of the
        text encoder, so the batches that follow need only the transformer. They stay cached (on
        the CPU) until `release_prompts` is called with the same requests: a worker runs several
        shards at once, each holds its own."""
        if self.turns and self.turns.active:
            self.turns.encode_ahead(self._cache_keys(requests), self._encode_on_device, batch_size)

    def release_prompts(self, requests: Sequence[GenerationRequest]) -> None:
        """low_vram: the shard that encoded these requests ahead is done with them."""
        if self.turns and self.turns.active:
            self.turns.release(self._cache_keys(requests))

    def _cache_keys(self, requests: Sequence[GenerationRequest]) -> list[tuple[str, bool]]:
        """The templated texts these requests encode, each once."""
        prompts = [r.prompt for r in requests]
        prompts += [r.negative_prompt or "" for r in requests if r.guidance_scale > 0]
        return [(t, self.pad_prompts_to_max) for t in dict.fromkeys(self._template(p) for p in prompts)]

    @torch.inference_mode()
    def _encode_on_device(self, texts: list[str], pad_to_max: bool) -> list[torch.Tensor]:
        self._bring("text_encoder")
        return self._run_text_encoder(texts, pad_to_max)

    def _run_text_encoder(self, texts: list[str], pad_to_max: bool) -> list[torch.Tensor]:
        tokens = self.pipe.tokenizer(
            texts,
            padding="max_length" if pad_to_max else "longest",
            max_length=MAX_SEQUENCE_LENGTH,
            truncation=True,
            return_tensors="pt",
        )
        input_ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device).bool()
        hidden = self.pipe.text_encoder(
            input_ids=input_ids, attention_mask=mask, output_hidden_states=True
        ).hidden_states[-2]
        return [hidden[i][mask[i]] for i in range(len(texts))]

    def prepare_latents(self, batch: list[GenerationRequest]) -> torch.Tensor:
        """Noise per row from the row's seed, drawn on the CPU (reproducible across devices of a kind)."""
        scale = self.pipe.vae_scale_factor * 2
        channels = self.pipe.transformer.in_channels
        noise = [
            torch.randn(
                (1, channels, 2 * (r.height // scale), 2 * (r.width // scale)),
                generator=torch.Generator("cpu").manual_seed(r.seed),
                dtype=torch.float32,
            )
            for r in batch
        ]
        return torch.cat(noise).to(self.device)

    def retrieve_timesteps(self, latents: torch.Tensor, steps: int) -> tuple[Any, torch.Tensor]:
        """The reference pipelines' schedule: `steps` transformer passes (diffusers >= 0.39)."""
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

        scheduler = copy.deepcopy(self.pipe.scheduler)
        image_seq_len = (latents.shape[2] // 2) * (latents.shape[3] // 2)
        config = scheduler.config
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(steps, device=self.device, sigmas=get_default_z_image_sigmas(steps), mu=mu)
        scheduler.set_begin_index(0)
        return scheduler, scheduler.timesteps

    def denoise(
        self,
        latents: torch.Tensor,
        positive: list[torch.Tensor],
        negative: list[torch.Tensor],
        settings: GenerationRequest,
        schedule: tuple | None = None,
        forward: Callable | None = None,
        after_step: Callable | None = None,
    ) -> torch.Tensor:
        """The reference denoising loop. Edit modes pass their own (scheduler, timesteps), a
        transformer call `forward(latents, timestep, captions)` and a hook run after each step."""
        self._bring("transformer")
        transformer = self.pipe.transformer
        scheduler, timesteps = schedule or self.retrieve_timesteps(latents, settings.num_inference_steps)
        forward = forward or self._forward
        n = latents.shape[0]
        guidance = settings.guidance_scale
        for i, t in enumerate(timesteps):
            timestep = (1000 - t.expand(n)) / 1000
            t_norm = float((1000 - t.float()) / 1000)
            apply_cfg = guidance > 0 and not (settings.cfg_truncation <= 1 and t_norm > settings.cfg_truncation)
            model_latents = latents.to(transformer.dtype)
            if apply_cfg:
                model_latents = model_latents.repeat(2, 1, 1, 1)
                captions = positive + negative
                timestep = timestep.repeat(2)
            else:
                captions = positive
            out = forward(list(model_latents.unsqueeze(2).unbind(dim=0)), timestep, captions)
            if apply_cfg:
                preds = [apply_guidance(out[j].float(), out[n + j].float(), guidance, settings) for j in range(n)]
            else:
                preds = [o.float() for o in out]
            noise_pred = -torch.stack(preds).squeeze(2)
            latents = scheduler.step(noise_pred.to(torch.float32), t, latents, return_dict=False)[0]
            if after_step is not None:
                latents = after_step(i, latents)
        return latents

    def _forward(self, latents: list[torch.Tensor], timestep: torch.Tensor, captions: list) -> list[torch.Tensor]:
        return self.pipe.transformer(latents, timestep, captions, return_dict=False)[0]

    def vae_parts(self, batch: torch.Tensor) -> Sequence[torch.Tensor]:
        """What the VAE sees at once: the whole batch, or one row at a time with low_vram
        (a 1024x1024 decode needs about 2 GiB per row)."""
        return batch.split(1) if self.low_vram else [batch]

    def decode_latents(self, latents: torch.Tensor) -> list[np.ndarray]:
        vae = self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = torch.cat([vae.decode(part, return_dict=False)[0] for part in self.vae_parts(latents)])
        images = self.pipe.image_processor.postprocess(images, output_type="np")
        return [(image * 255).round().astype(np.uint8) for image in images]
