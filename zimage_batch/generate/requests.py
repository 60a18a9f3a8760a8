"""What the engine is asked to draw: one request per image, typed, and the key that says
which requests can share one denoising loop.

Every request starts with its prompt, seed, size, steps and guidance; the optional sampler
settings (negative prompt, CFG truncation and normalisation, the ControlNet's scale, ...) and
which of them the batch key holds come from their declaration (zimage_batch/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from PIL import Image

from zimage_batch.inputs.lora_spec import AdapterSet
from zimage_batch.model.variants import Variant
from zimage_batch.settings import Here, batch_key_names, request_settings, with_settings


@dataclass(frozen=True)
@with_settings
class GenerationRequest:
    """One image to draw."""

    prompt: str
    seed: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    _settings: ClassVar[Here] = Here(lambda: request_settings("text-to-image"))
    lora: AdapterSet = ()  # LoRA adapters and scales, canonical (inputs.lora_spec); () for none

    def batch_key(self) -> tuple:
        """Rows with equal keys can share one batch (every kind of request's key starts with its
        task, so the keys of a shard that mixes kinds sort together)."""
        return ("text-to-image", *sampler_key(self))


def sampler_key(request: GenerationRequest | EditRequest | ControlRequest) -> tuple:
    """The output shape, the sampler settings every kind of request shares (those declared with
    `batch_key`) and the LoRA adapter set: rows that differ here cannot share one denoising loop."""
    return (*(getattr(request, name) for name in batch_key_names("text-to-image")), request.lora)


def kind_key(request: EditRequest | ControlRequest, kind: str) -> tuple:
    """The batch key's settings declared for `kind` alone (a ControlNet's scale), as floats."""
    shared = set(batch_key_names("text-to-image"))
    return tuple(float(getattr(request, name)) for name in batch_key_names(kind) if name not in shared)


@dataclass(eq=False)
@with_settings
class EditRequest:
    """One edited image to draw: a source image (RGB) and, for inpaint, a mask (L, white repaints)."""

    prompt: str
    seed: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    mode: str  # img2img | inpaint | edit
    image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float = 0.6  # img2img and inpaint
    _settings: ClassVar[Here] = Here(lambda: request_settings("edit"))
    lora: AdapterSet = ()

    def batch_key(self) -> tuple:
        """Rows with equal keys can share one batch."""
        return (self.mode, *sampler_key(self), -1.0 if self.mode == "edit" else self.strength)


def infer_mode(mode: str | None, has_mask: bool, variant: Variant) -> str:
    """The row's mode, else: a mask means inpaint, an editing variant means edit, else img2img."""
    if mode:
        return mode
    if has_mask:
        return "inpaint"
    return "edit" if "edit" in variant.tasks else "img2img"


@dataclass(eq=False)
@with_settings
class ControlRequest:
    """One image drawn under a ControlNet condition: text-to-image as `ZImageControlNetPipeline`,
    or, with a source and a mask, inpaint as `ZImageControlNetInpaintPipeline`.

    `control` says where the condition comes from: `image` (a given control image) or a kind
    derived from the row's source on the CPU (`canny`, `tile`). The pixels (`control_image`,
    and for inpaint `image` and `mask`) are filled in when the row is loaded, at the output size.
    """

    prompt: str
    seed: int
    width: int | None
    height: int | None
    num_inference_steps: int
    guidance_scale: float
    control: str = "image"  # image | canny | tile
    control_uri: str | None = None  # the given control image
    inpaint: bool = False
    control_image: Image.Image | None = None
    image: Image.Image | None = None  # inpaint: the source (RGB)
    mask: Image.Image | None = None  # inpaint: L, white repaints
    _settings: ClassVar[Here] = Here(lambda: request_settings("control"))
    lora: AdapterSet = ()

    @property
    def mode(self) -> str:
        """What the metadata's `mode` column records for the row."""
        return "controlnet-inpaint" if self.inpaint else "controlnet"

    def batch_key(self) -> tuple:
        """Rows with equal keys can share one batch: one size, sampler and control setting
        (the condition image itself is per row)."""
        return (self.mode, *sampler_key(self), self.control, *kind_key(self, "control"))


def release_pixels(request) -> None:  # noqa: ANN001 - any kind of request
    """Drop a generated request's images (a shard holds its requests until it ends)."""
    for name in ("image", "mask", "control_image"):
        if hasattr(request, name):
            setattr(request, name, None)
