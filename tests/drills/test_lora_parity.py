"""LoRA adapters in the Engine against diffusers' own ZImagePipeline (issue 17).

Every adapter set a row may choose (none, one at 1.0, one at 0.8, two with their own scales)
runs in one Engine that loaded every adapter once, in batches smaller than the rows, with sets
switching between batches; each row's pixels must be within 1/255 of a fresh
`ZImagePipeline.from_pretrained(tiny)` that called `load_lora_weights(file, adapter_name=name)`
for the adapters and `set_adapters(names, scales)` (no adapter at all for `none`).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from zimage_batch.generate.engine import Engine
from zimage_batch.generate.requests import GenerationRequest
from zimage_batch.inputs.lora_spec import parse_lora
from zimage_batch.model.tiny import make_tiny_model
from zimage_batch.model.tiny_adapters import make_tiny_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOLERANCE = 1  # 1/255
SPECS = ["none", "style", "style:0.8", "style:0.5,detail:1.5", "detail:1.5,style:0.5"]  # the last two: one set


def _rows() -> list[GenerationRequest]:
    rows = []
    for i, spec in enumerate(SPECS * 2):
        width = 96 if i >= 8 else 64  # the last set's rows are another shape too
        rows.append(GenerationRequest(f"a watercolor cat, variation {i}", 100 + i, width, 64, 4, 0.0, lora=parse_lora(spec)))
    rows.append(GenerationRequest("a dog, with guidance", 7, 64, 64, 4, 3.0, negative_prompt="blurry",
                                  lora=parse_lora("detail:0.3")))
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-parity")
    model = make_tiny_model(root / "tiny", "turbo")
    files = {name: str(make_tiny_adapter(model, root / f"{name}.safetensors", name)) for name in ("style", "detail")}
    kohya = str(make_tiny_adapter(model, root / "style-kohya.safetensors", "style", "kohya"))
    return str(model), files, kohya


@pytest.fixture(scope="module")
def drawn(tiny):
    """The engine's pixels for every row, batches of 2 (sets switch between batches)."""
    model, files, _ = tiny
    engine = Engine(model, "turbo", device="cpu", adapters=files)
    rows = _rows()
    return rows, engine.generate(rows, batch_size=2), engine


def _reference_pipe(model: str, files: dict[str, str]):
    from diffusers import ZImagePipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = ZImagePipeline.from_pretrained(model)
        pipe.set_progress_bar_config(disable=True)
        for name, path in files.items():
            pipe.load_lora_weights(path, adapter_name=name)
    return pipe


def reference(pipe, r: GenerationRequest) -> np.ndarray:
    if r.lora:
        pipe.set_adapters([name for name, _ in r.lora], [scale for _, scale in r.lora])
    out = pipe(
        prompt=r.prompt, negative_prompt=r.negative_prompt, width=r.width, height=r.height,
        num_inference_steps=r.num_inference_steps, guidance_scale=r.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np",
    ).images[0]
    return (out * 255).round().astype(np.uint8)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_every_adapter_set_matches_diffusers_across_batches(tiny, drawn):
    model, files, _ = tiny
    rows, images, engine = drawn
    plain = _reference_pipe(model, {})  # `none` rows: a pipeline that never saw an adapter
    with_adapters = _reference_pipe(model, files)
    for i, (row, got) in enumerate(zip(rows, images)):
        want = reference(with_adapters if row.lora else plain, row)
        assert max_diff(got, want) <= TOLERANCE, f"row {i} ({row.lora}) differs from diffusers by {max_diff(got, want)}/255"
    assert engine.adapters.switches >= 4  # the sets really alternated between batches


def test_adapters_change_the_pixels_and_the_scale_matters(tiny, drawn):
    """Random-init adapters with non-zero lora_B: a no-op adapter would make the parity vacuous."""
    from dataclasses import replace

    model, _, _ = tiny
    rows, images, engine = drawn
    # The same batches as `drawn` (2): on CPU fp32 a batch size moves pixels by up to 1/255.
    bare = Engine(model, "turbo", device="cpu").generate([replace(r, lora=()) for r in rows], batch_size=2)
    for row, got, without in zip(rows, images, bare):
        if row.lora:
            assert max_diff(got, without) > 8, f"adapter set {row.lora} hardly changes the image"
        else:
            assert max_diff(got, without) <= 1  # `none` with adapters loaded is the bare model
    row = rows[1]
    full, weaker = engine.generate([row, replace(row, lora=(("style", 0.8),))])
    assert max_diff(full, weaker) > 2


def test_the_same_set_in_any_order_is_one_batch_key(drawn):
    rows, _, _ = drawn
    assert rows[3].lora == rows[4].lora == (("detail", 1.5), ("style", 0.5))
    assert rows[3].batch_key() == rows[4].batch_key() != rows[2].batch_key()


def test_a_community_lora_unet_file_loads_and_matches_its_diffusers_twin(tiny, drawn):
    """The kohya-style file (lora_unet_* keys, lora_down/lora_up, alpha) goes through diffusers'
    converter; it holds the same adapter as style.safetensors, so the pixels are the same."""
    model, _, kohya = tiny
    rows, images, _ = drawn
    from safetensors import safe_open

    with safe_open(kohya, "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".alpha") for k in keys)
    engine = Engine(model, "turbo", device="cpu", adapters={"style": kohya})
    picked = [i for i, r in enumerate(rows) if r.lora and {n for n, _ in r.lora} == {"style"}]
    got = engine.generate([rows[i] for i in picked], batch_size=2)
    pipe = _reference_pipe(model, {"style": kohya})
    for i, image in zip(picked, got):
        assert max_diff(image, images[i]) <= TOLERANCE
        assert max_diff(image, reference(pipe, rows[i])) <= TOLERANCE


def test_a_request_for_an_adapter_the_engine_lacks_is_a_row_error(tiny, drawn):
    _, _, engine = drawn
    with pytest.raises(ValueError, match="not loaded"):
        engine.generate([GenerationRequest("x", 1, 64, 64, 2, 0.0, lora=(("ink", 1.0),))])


def test_img2img_and_inpaint_rows_use_their_adapters_too(tiny):
    """Edit rows choose adapters like prompt rows: against ZImageImg2ImgPipeline /
    ZImageInpaintPipeline with the same load_lora_weights and set_adapters calls."""
    from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline
    from PIL import Image

    from zimage_batch.generate.edit import EditEngine
    from zimage_batch.generate.requests import EditRequest

    model, files, _ = tiny
    y, x = np.mgrid[0:64, 0:64]
    source = Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8))
    mask = Image.fromarray(((x > 20) * 255).astype(np.uint8), "L")
    rows = [EditRequest(f"a red product, take {i}", 200 + i, 64, 64, 4, 0.0, mode, source,
                        mask if mode == "inpaint" else None, 0.7, lora=parse_lora(spec))
            for i, (mode, spec) in enumerate([("img2img", "none"), ("img2img", "style"), ("img2img", "style:0.6,detail"),
                                              ("inpaint", "detail:1.2"), ("inpaint", "none"), ("img2img", "style")])]
    engine = EditEngine(model, "turbo", device="cpu", adapters=files)
    images = engine.generate(rows, batch_size=2)
    pipes = {}
    for cls in (ZImageImg2ImgPipeline, ZImageInpaintPipeline):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = cls.from_pretrained(model)
            for name, path in files.items():
                pipe.load_lora_weights(path, adapter_name=name)
        pipe.set_progress_bar_config(disable=True)
        pipes[cls] = pipe
    for i, (r, got) in enumerate(zip(rows, images)):
        pipe = pipes[ZImageInpaintPipeline if r.mode == "inpaint" else ZImageImg2ImgPipeline]
        if r.lora:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in r.lora], [s for _, s in r.lora])
        else:
            pipe.disable_lora()
        extra = {"mask_image": r.mask} if r.mode == "inpaint" else {}
        out = pipe(prompt=r.prompt, image=r.image, strength=r.strength, width=64, height=64, num_inference_steps=4,
                   guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np", **extra)
        want = (out.images[0] * 255).round().astype(np.uint8)
        assert max_diff(got, want) <= TOLERANCE, f"edit row {i} ({r.mode}, {r.lora})"
    from dataclasses import replace

    assert max_diff(images[1], engine.generate([replace(rows[1], lora=())])[0]) > 8  # the adapter did something
