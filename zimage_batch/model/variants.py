"""The Z-Image variant registry: one entry per model variant, the only place to add one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """Defaults and capabilities of one Z-Image variant."""

    name: str
    hub_id: str | None
    pipeline_class: str  # the diffusers reference pipeline for text-to-image
    tasks: tuple[str, ...]
    num_inference_steps: int
    guidance_scale: float
    scheduler_shift: float = 3.0
    needs_siglip: bool = False
    min_side: int = 64
    max_side: int = 2048


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            name="turbo",
            hub_id="Tongyi-MAI/Z-Image-Turbo",
            pipeline_class="ZImagePipeline",
            tasks=("text-to-image", "img2img", "inpaint", "controlnet"),
            # Turbo is distilled for 8 NFE. The model card's "9 steps" is diffusers' count before
            # 0.39, whose last step sat at sigma 0 and changed nothing; since diffusers 0.39
            # (PR #13730) the same schedule is num_inference_steps=8.
            num_inference_steps=8,
            guidance_scale=0.0,
        ),
        Variant(
            name="base",
            hub_id="Tongyi-MAI/Z-Image",
            pipeline_class="ZImagePipeline",
            tasks=("text-to-image", "img2img", "inpaint", "negative-prompt", "controlnet"),
            num_inference_steps=50,
            guidance_scale=4.0,
        ),
        Variant(
            name="omni",
            hub_id=None,  # not public yet: local or s3:// folders only
            pipeline_class="ZImageOmniPipeline",
            tasks=("text-to-image", "edit", "negative-prompt"),
            num_inference_steps=50,
            guidance_scale=4.0,
            needs_siglip=True,
        ),
    )
}


def get_variant(name: str) -> Variant:
    """Look a variant up by name, with a clear error for unknown names."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}") from None


def variant_for_hub_id(repo_id: str) -> str | None:
    """The variant whose public checkpoint is `repo_id`, if any."""
    for v in VARIANTS.values():
        if v.hub_id and v.hub_id.lower() == repo_id.lower():
            return v.name
    return None
