"""The edit engine against diffusers' own edit pipelines.

img2img and inpaint on tiny turbo and base checkpoints against `ZImageImg2ImgPipeline` and
`ZImageInpaintPipeline`, instruction editing on a tiny omni checkpoint against
`ZImageOmniPipeline` (in bf16: the reference casts reference images to bf16 inside). For every
row, the Engine's pixels, in a mixed batch and alone, are within 1/255 of the reference's for
the same inputs and seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_batch.generate.edit import EditEngine as Engine
from zimage_batch.generate.edit import prepare_source
from zimage_batch.generate.requests import EditRequest, infer_mode
from zimage_batch.model.tiny import make_tiny_model
from zimage_batch.model.variants import get_variant

TOLERANCE = 1  # 1/255


def gradient(width: int, height: int, phase: int = 0) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x * 3 + y + phase) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def box_mask(width: int, height: int) -> Image.Image:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 3 :] = 255
    return Image.fromarray(mask, "L")


def edit_row(seed, mode, source_size, size, guidance, strength=0.6, negative=None, steps=6, prompt=None):
    """An EditRequest whose source (of `source_size`) is prepared for the output `size`."""
    width, height = size
    source = gradient(*source_size, phase=seed)
    mask = box_mask(*source_size) if mode == "inpaint" else None
    image, mask = prepare_source(source, mask, mode, width, height)
    request = EditRequest(
        prompt or f"make the product red, variant {seed}", seed, width, height, steps, guidance, mode,
        image, mask, strength, negative_prompt=negative,
    )
    return source, request


# Sizes, strengths, CFG on/off and negative prompts mixed; several rows share a batch key.
IMG_ROWS = [
    ("img2img", (70, 67), (64, 64), 0.6),
    ("img2img", (64, 64), (64, 64), 0.6),
    ("img2img", (100, 80), (80, 64), 1.0),
    ("img2img", (64, 64), (64, 64), 0.3),
    ("inpaint", (64, 64), (64, 64), 0.8),
    ("inpaint", (90, 60), (64, 64), 0.8),
    ("inpaint", (64, 96), (64, 96), 1.0),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-edit")
    return {v: make_tiny_model(root / v, v, seed=seed) for seed, v in enumerate(("turbo", "base", "omni"))}


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (image * 255).round().astype(np.uint8)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.mark.parametrize("variant", ["turbo", "base"])
def test_img2img_and_inpaint_match_reference(checkpoints, variant):
    from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline

    engine = Engine(str(checkpoints[variant]), variant, device="cpu")
    guidance = get_variant(variant).guidance_scale
    rows = [
        edit_row(10 + i, mode, src, size, guidance, strength, negative="blurry" if i % 2 else None)[1]
        for i, (mode, src, size, strength) in enumerate(IMG_ROWS)
    ]
    rows.append(edit_row(30, "img2img", (64, 64), (64, 64), 0.0)[1])  # CFG off on base too
    mixed = engine.generate(rows, batch_size=8)
    # the reference pipelines share the engine's loaded modules (no second load)
    img2img = ZImageImg2ImgPipeline(**engine.pipe.components)
    inpaint = ZImageInpaintPipeline(**engine.pipe.components)
    for pipe in (img2img, inpaint):
        pipe.set_progress_bar_config(disable=True)
    for i, (r, got) in enumerate(zip(rows, mixed)):
        args = dict(
            prompt=r.prompt, image=r.image, strength=r.strength, width=r.width, height=r.height,
            num_inference_steps=r.num_inference_steps, guidance_scale=r.guidance_scale,
            negative_prompt=r.negative_prompt, generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np",
        )
        out = inpaint(mask_image=r.mask, **args) if r.mode == "inpaint" else img2img(**args)
        want = to_uint8(out.images[0])
        assert got.shape == (r.height, r.width, 3)
        assert max_diff(got, want) <= TOLERANCE, f"{variant} row {i} ({r.mode}) in a mixed batch"
        if i in (0, 4):
            alone = engine.generate([r])[0]
            assert max_diff(alone, want) <= TOLERANCE, f"{variant} row {i} ({r.mode}) alone"


def test_omni_edit_matches_reference(checkpoints):
    """Instruction editing with SigLIP 2 features and reference latents, bf16 in both."""
    engine = Engine(str(checkpoints["omni"]), "omni", device="cpu", dtype=torch.bfloat16)
    cases = [
        edit_row(40, "edit", (64, 64), (64, 64), 4.0, steps=5),
        edit_row(41, "edit", (96, 80), (64, 64), 4.0, negative="ugly", steps=5),  # cropped to 96x80
        edit_row(42, "edit", (96, 80), (96, 80), 0.0, steps=5),
        edit_row(43, "edit", (1100, 1000), (64, 64), 3.0, steps=4),  # over 1 MP: shrunk to the output area
    ]
    mixed = engine.generate([r for _, r in cases], batch_size=8)
    pipe = engine.pipe  # the engine loaded diffusers' ZImageOmniPipeline itself
    assert type(pipe).__name__ == "ZImageOmniPipeline"
    for i, ((source, r), got) in enumerate(zip(cases, mixed)):
        out = pipe(
            image=[source], prompt=r.prompt, width=r.width, height=r.height,
            num_inference_steps=r.num_inference_steps, guidance_scale=r.guidance_scale,
            negative_prompt=r.negative_prompt, generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np",
        )
        want = to_uint8(out.images[0])
        assert max_diff(got, want) <= TOLERANCE, f"omni row {i}"
    assert max_diff(engine.generate([cases[1][1]])[0], mixed[1]) <= TOLERANCE


def test_omni_edit_runs_in_float32(checkpoints):
    """On CPU the engine runs fp32, where diffusers' omni pipeline cannot (it casts to bf16)."""
    engine = Engine(str(checkpoints["omni"]), "omni", device="cpu")
    _, r = edit_row(50, "edit", (80, 64), (80, 64), 4.0, steps=3)
    first, again = engine.generate([r])[0], engine.generate([r])[0]
    assert first.shape == (64, 80, 3) and np.array_equal(first, again)


def test_modes_and_preparation():
    turbo, omni = get_variant("turbo"), get_variant("omni")
    assert infer_mode(None, True, turbo) == "inpaint"
    assert infer_mode(None, False, turbo) == "img2img"
    assert infer_mode(None, False, omni) == "edit"
    assert infer_mode("img2img", True, turbo) == "img2img"
    image, mask = prepare_source(gradient(100, 50), box_mask(100, 50), "inpaint", 96, 48)
    assert image.size == mask.size == (96, 48) and mask.mode == "L"
    with pytest.raises(ValueError, match="mask"):
        prepare_source(gradient(64, 64), None, "inpaint", 64, 64)
    with pytest.raises(ValueError, match="too small"):
        prepare_source(gradient(40, 64), None, "edit", 64, 64)
    small, _ = prepare_source(gradient(2000, 1000), None, "edit", 128, 64)
    assert small.width * small.height <= 128 * 64
