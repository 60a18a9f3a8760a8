"""Edit generation on a loaded `Engine`: img2img and inpaint (turbo, base), instruction editing (omni).

It follows diffusers' `ZImageImg2ImgPipeline`, `ZImageInpaintPipeline` and `ZImageOmniPipeline`
step for step (the same random draws in the same order from a CPU generator seeded with the
row's seed, the same scheduler, CFG rule and VAE calls), so a row's pixels match the reference
pipeline for the same inputs and seed. It reuses the Engine's prompt encoder, scheduler set-up,
denoising loop and decoder. img2img and inpaint rows that share a size and sampler settings run
as one batch; omni edits run row by row.

Pixels are prepared on the CPU first (`prepare_source`, run by the worker ahead of the GPU):
img2img/inpaint sources and masks are resized to the output size; omni sources get the omni
pipeline's own area cap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from zimage_batch.generate.engine import Engine
from zimage_batch.generate.requests import EditRequest

OMNI_MAX_AREA = 1024 * 1024  # the omni pipeline shrinks larger reference images to the output area


def prepare_source(
    image: Image.Image, mask: Image.Image | None, mode: str, width: int, height: int
) -> tuple[Image.Image, Image.Image | None]:
    """CPU-side preparation matching the reference pipelines' own preprocessing.

    img2img / inpaint: image and mask resized (Lanczos) to the output size.
    edit: the omni pipeline's checks, and its shrink of sources over 1 MP to the output area.
    Raises ValueError with a reason when the source cannot be used.
    """
    if mode == "edit":
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        Flux2ImageProcessor.check_image_input(image)
        if image.width * image.height > OMNI_MAX_AREA:
            image = Flux2ImageProcessor._resize_to_target_area(image, width * height)
        return image, None
    if mode == "inpaint" and mask is None:
        raise ValueError("inpaint needs a mask")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    if mask is not None and mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    return image, mask


class EditEngine(Engine):
    """An `Engine` that also draws edit requests (the worker uses it for edit manifests)."""

    def _generate_batch(self, batch: list) -> list[np.ndarray]:
        if not isinstance(batch[0], EditRequest):
            return super()._generate_batch(batch)
        return generate_edit_batch(self, batch)


def generate_edit_batch(engine: Engine, batch: list[EditRequest]) -> list[np.ndarray]:
    """Draw one batch of edit requests sharing a batch key; HxWx3 uint8 arrays in order."""
    mode = batch[0].mode
    if mode not in engine.variant.tasks:
        raise ValueError(f"mode {mode!r} is not supported by the {engine.variant.name} variant")
    if mode == "edit":  # row by row: in bf16, padding reference images of other sizes moves pixels
        return [_omni_edit(engine, r) for r in batch]
    return _img2img(engine, batch, inpaint=mode == "inpaint")


# ---------------------------------------------------------------------- img2img / inpaint
def _img2img(engine: Engine, batch: list[EditRequest], inpaint: bool) -> list[np.ndarray]:
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.utils.torch_utils import randn_tensor

    pipe, device, first, n = engine.pipe, engine.device, batch[0], len(batch)
    vae = pipe.vae
    use_cfg = first.guidance_scale > 0
    texts = [r.prompt for r in batch] + ([r.negative_prompt or "" for r in batch] if use_cfg else [])
    embeds = engine.prompts.encode(texts, engine.encode_prompt)
    positive, negative = embeds[:n], embeds[n:]
    dtype = positive[0].dtype  # the reference prepares image latents and noise in the prompt dtype

    scale = pipe.vae_scale_factor * 2
    processor = VaeImageProcessor(vae_scale_factor=scale)
    for r in batch:
        if r.image is None or r.image.size != (r.width, r.height):
            raise ValueError(f"source must be prepared at the output size {r.width}x{r.height}")
    images = torch.cat([processor.preprocess(r.image) for r in batch]).to(torch.float32)
    shape = (1, pipe.transformer.in_channels, 2 * (first.height // scale), 2 * (first.width // scale))

    scheduler, timesteps = engine.retrieve_timesteps(torch.empty(shape, device="meta"), first.num_inference_steps)
    steps = len(timesteps)
    t_start = int(max(steps - min(steps * first.strength, steps), 0))
    timesteps = timesteps[t_start * scheduler.order :]
    scheduler.set_begin_index(t_start * scheduler.order)
    if len(timesteps) < 1:
        raise ValueError(f"strength {first.strength} leaves no denoising step of {steps}")

    # Per row, in the reference's order: the VAE posterior sample, then the noise.
    generators = [torch.Generator("cpu").manual_seed(r.seed) for r in batch]
    images = images.to(device=device, dtype=dtype)
    moments = torch.cat([vae.encode(part).latent_dist.parameters for part in engine.vae_parts(images)])
    image_latents = torch.cat(
        [DiagonalGaussianDistribution(moments[i : i + 1]).sample(g) for i, g in enumerate(generators)]
    )
    image_latents = (image_latents - vae.config.shift_factor) * vae.config.scaling_factor
    noise = torch.cat([randn_tensor(shape, generator=g, device=torch.device(device), dtype=dtype) for g in generators])
    latents = scheduler.scale_noise(image_latents, timesteps[:1].repeat(n), noise)

    blend = _masked_blend(batch, scale, shape, dtype, scheduler, timesteps, image_latents, noise) if inpaint else None
    latents = engine.denoise(latents, positive, negative, first, schedule=(scheduler, timesteps), after_step=blend)
    return engine.decode_latents(latents)


def _masked_blend(batch: list[EditRequest], scale: int, shape: tuple, dtype: torch.dtype, scheduler: Any,
                  timesteps: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor) -> Callable:
    """The inpaint step hook: outside the mask, the source latents noised to the next step's level."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=scale, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    masks = torch.cat([processor.preprocess(r.mask, height=r.height, width=r.width) for r in batch])
    masks = torch.nn.functional.interpolate(masks, size=shape[2:], mode="nearest")
    masks = masks.to(device=image_latents.device, dtype=dtype)

    def blend(i: int, latents: torch.Tensor) -> torch.Tensor:
        known = image_latents
        if i < len(timesteps) - 1:
            known = scheduler.scale_noise(image_latents, timesteps[i + 1 : i + 2], noise)
        return (1 - masks) * known + masks * latents

    return blend


# ---------------------------------------------------------------------- omni edit
def omni_prompt_segments(prompt: str) -> list[str]:
    """The omni pipeline's prompt template for one reference image: three separately encoded texts."""
    return [
        "<|im_start|>user\n<|vision_start|>",
        "<|vision_end|>" + prompt + "<|im_end|>\n<|im_start|>assistant\n<|vision_start|>",
        "<|vision_end|><|im_end|>",
    ]


def _omni_edit(engine: Engine, r: EditRequest) -> np.ndarray:
    """One instruction edit: the prompt around one reference image, its VAE latents and SigLIP 2
    features, as ZImageOmniPipeline builds them (prompts padded to 512 tokens, as there)."""
    pipe, device = engine.pipe, engine.device
    transformer, vae = pipe.transformer, pipe.vae

    texts = omni_prompt_segments(r.prompt)
    if r.guidance_scale > 0:
        texts += omni_prompt_segments(r.negative_prompt or "")
    embeds = engine.encode_texts(texts, pad_to_max=True)
    positive = [embeds[:3]]
    negative = [embeds[3:]] if r.guidance_scale > 0 else []

    multiple = pipe.vae_scale_factor * 2
    w, h = r.image.width // multiple * multiple, r.image.height // multiple * multiple
    pixels = pipe.image_processor.preprocess(r.image, height=h, width=w, resize_mode="crop")
    pixels = pixels.to(device=device, dtype=torch.float32)
    latent = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()[0]
    latent = (latent - vae.config.shift_factor) * vae.config.scaling_factor
    reference = latent.unsqueeze(1).to(torch.float32).to(transformer.dtype)

    inputs = pipe.siglip_processor(images=[r.image], return_tensors="pt").to(device)
    rows, cols = (int(v) for v in inputs.spatial_shapes[0])
    hidden = pipe.siglip(**inputs).last_hidden_state
    siglip = hidden[:, : rows * cols].view(rows, cols, hidden.shape[-1]).to(torch.float32).to(transformer.dtype)

    def forward(latents: list[torch.Tensor], timestep: torch.Tensor, caps: list) -> list[torch.Tensor]:
        k = len(latents)  # 1, or 2 under CFG (positive, then negative)
        return transformer(
            x=[[reference, latents[i]] for i in range(k)],
            t=timestep,
            cap_feats=caps,
            siglip_feats=[[siglip, None] for _ in range(k)],
            image_noise_mask=[[0, 1] for _ in range(k)],
            return_dict=False,
        )[0]

    latents = engine.prepare_latents([r])  # float32 noise from the row's CPU generator
    latents = engine.denoise(latents, positive, negative, r, forward=forward)
    return engine.decode_latents(latents)[0]
