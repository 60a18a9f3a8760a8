"""ControlNet generation on a loaded `Engine`: text-to-image and inpaint under a ControlNet Union.

It follows diffusers' `ZImageControlNetPipeline` and `ZImageControlNetInpaintPipeline` step for
step, so a row's pixels match theirs for the same inputs and seed:

1. the condition image (at the output size) goes through the VAE, its mode taken (no random
   draw), shifted and scaled, as one frame: the control latents;
2. 1.0 ControlNets (16 input channels) take them as they are; 2.x ones (33) take them padded
   with zeros or, for inpaint, followed by the inverted mask at latent size and the latents of
   the source with the repainted area blacked out (again the VAE's mode);
3. noise from the row's seed (the first and only random draw), the reference schedule, and in
   each step the ControlNet's hints (scaled by `control_scale`) added to the transformer's
   layers; under CFG the control context goes with the positive and the negative half alike.

Rows that share a size, sampler settings and control setting run as one batch; each row has
its own condition image. Rows without a condition never come here: they run exactly as without
a ControlNet. The condition images are prepared on the CPU ahead of the GPU (`inputs/control.py`).
"""

from __future__ import annotations

import numpy as np
import torch

from zimage_batch.generate.edit import EditEngine
from zimage_batch.generate.engine import Engine
from zimage_batch.generate.requests import ControlRequest
from zimage_batch.model.controlnet import input_width, load_controlnet


class ControlNetEngine(EditEngine):
    """An `EditEngine` with a ControlNet loaded beside its transformer; draws every kind of request."""

    def __init__(self, model_dir: str | None, variant: str = "turbo", controlnet_path: str | None = None,
                 controlnet=None, **kwargs) -> None:  # noqa: ANN001 - a loaded ZImageControlNetModel
        """`controlnet_path`: a .safetensors file or diffusers folder; or an already loaded `controlnet`."""
        super().__init__(model_dir, variant, **kwargs)
        if controlnet is None:
            controlnet = load_controlnet(controlnet_path, self.pipe.transformer, self.dtype, self.device)
        self.controlnet = controlnet

    def _generate_batch(self, batch: list) -> list[np.ndarray]:
        if isinstance(batch[0], ControlRequest):
            return generate_control_batch(self, batch)
        return super()._generate_batch(batch)


def generate_control_batch(engine: Engine, batch: list[ControlRequest]) -> list[np.ndarray]:
    """Draw one batch of ControlNet requests sharing a batch key; HxWx3 uint8 arrays in order."""
    if "controlnet" not in engine.variant.tasks:
        raise ValueError(f"the {engine.variant.name} variant does not run a ControlNet")
    first, n = batch[0], len(batch)
    for r in batch:
        for name in ("control_image", *(("image", "mask") if r.inpaint else ())):
            image = getattr(r, name)
            if image is None or image.size != (r.width, r.height):
                raise ValueError(f"{name} must be prepared at the output size {r.width}x{r.height}")
    texts = [r.prompt for r in batch]
    if first.guidance_scale > 0:
        texts += [r.negative_prompt or "" for r in batch]
    embeds = engine.prompts.encode(texts, engine.encode_prompt)
    positive, negative = embeds[:n], embeds[n:]
    control = control_context(engine, batch)
    latents = engine.prepare_latents(batch)  # the rows' only random draws
    controlnet, transformer = engine.controlnet, engine.pipe.transformer
    scale = float(first.control_scale)

    def forward(model_latents: list[torch.Tensor], timestep: torch.Tensor, captions: list) -> list[torch.Tensor]:
        context = control if len(model_latents) == n else control.repeat(2, 1, 1, 1, 1)  # CFG: both halves
        hints = controlnet(model_latents, timestep, captions, context, conditioning_scale=scale)
        return transformer(model_latents, timestep, captions, controlnet_block_samples=hints, return_dict=False)[0]

    latents = engine.denoise(latents, positive, negative, first, forward=forward)
    return engine.decode_latents(latents)


def control_context(engine: Engine, batch: list[ControlRequest]) -> torch.Tensor:
    """The ControlNet's input per row, (rows, control_in_dim, 1, h, w), as the reference pipelines
    build it: the condition's latents, padded (2.x) or with mask and masked source (inpaint)."""
    from diffusers.image_processor import VaeImageProcessor

    pipe, vae, device = engine.pipe, engine.pipe.vae, engine.device
    width = input_width(engine.controlnet)

    def pixels(images: list, processor: VaeImageProcessor = pipe.image_processor) -> torch.Tensor:
        tensors = [processor.preprocess(image, height=r.height, width=r.width) for image, r in zip(images, batch)]
        return torch.cat(tensors).to(device=device, dtype=vae.dtype)

    control = _latents(engine, pixels([r.control_image for r in batch]))
    channels = control.shape[1]
    if batch[0].inpaint:
        if width == channels:
            raise ValueError(f"ControlNet inpaint needs a 2.x ControlNet ({channels} + 17 input channels); "
                             f"this one takes {width}")
        masks = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_normalize=False, do_binarize=True,
                                  do_convert_grayscale=True)
        mask = torch.tile(pixels([r.mask for r in batch], masks), [1, 3, 1, 1])
        masked_source = _latents(engine, pixels([r.image for r in batch]) * (mask < 0.5))
        mask = torch.nn.functional.interpolate(1 - mask[:, :1], size=masked_source.shape[-2:], mode="nearest")
        return torch.cat([control, mask.unsqueeze(2), masked_source], dim=1)
    if width != channels:  # 2.x without inpaint: zeros where the mask and the masked source would be
        padding = torch.zeros(control.shape[0], width - channels, *control.shape[2:], dtype=control.dtype, device=device)
        control = torch.cat([control, padding], dim=1)
    return control


def _latents(engine: Engine, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's mode for each image, shifted and scaled, as one frame: (rows, 16, 1, h, w)."""
    vae = engine.pipe.vae
    latents = torch.cat([vae.encode(part).latent_dist.mode() for part in engine.vae_parts(pixels)])
    return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).unsqueeze(2)
