"""Derived masks against diffusers' own inpaint pipelines (issue 28): rows whose mask comes from
the source's alpha or from an outpaint canvas are loaded as the worker loads them, drawn by the
engine, and equal `ZImageInpaintPipeline` (and `ZImageControlNetInpaintPipeline` for a row with a
control condition) given the kept mask and the canvas, within 1/255 on CPU fp32."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_batch.generate.controlnet import ControlNetEngine
from zimage_batch.generate.edit import EditEngine
from zimage_batch.generate.requests import EditRequest
from zimage_batch.inputs.mask_spec import MaskJob
from zimage_batch.jobspec import JobSpec
from zimage_batch.model.tiny import make_tiny_model
from zimage_batch.model.tiny_controlnet import make_tiny_controlnet
from zimage_batch.model.variants import get_variant
from zimage_batch.run.loading import load_row
from zimage_batch.run.rows import request_for_row
from zimage_batch.run.settings import WorkerSettings

TOLERANCE = 1  # 1/255

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cutout(width: int, height: int, phase: int = 0) -> Image.Image:
    """A product cut-out: an opaque ellipse with a soft edge on a transparent background."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, (y * 7 + phase) % 256, (x * 3 + y + phase * 11) % 256], -1)
    r = ((x - width / 2) / (width / 3)) ** 2 + ((y - height / 2) / (height / 3)) ** 2
    alpha = np.clip((1.2 - r) * 400, 0, 255)
    return Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-masks")
    sources = {}
    for name, (w, h, phase) in {"a": (64, 64, 1), "b": (72, 56, 2), "c": (48, 64, 3)}.items():
        path = root / f"{name}.png"
        cutout(w, h, phase).save(path)
        sources[name] = str(path)
    model = make_tiny_model(root / "turbo", "turbo", seed=0)
    net = make_tiny_controlnet(root / "net.safetensors", "2.1", seed=3)
    return model, net, sources


def settings(**job) -> WorkerSettings:
    defaults = {"num_inference_steps": 4, "guidance_scale": 0.0, "negative_prompt": None, "cfg_truncation": 1.0,
                "cfg_normalization": 0.0, "strength": 0.9}
    return WorkerSettings(JobSpec(manifest="m", output="o", model="tiny:turbo"), model="tiny:turbo", variant="turbo",
                          job_variant="turbo", fingerprint="f", defaults=defaults, masks=MaskJob(**job))


def load(rows: list[dict], s: WorkerSettings):
    """Each row's request and kept mask, loaded as the worker loads them."""
    variant = get_variant("turbo")
    loaded = []
    for row in rows:
        template = request_for_row(row, s, variant, edit=True)
        got = load_row(row, template, "", variant, 64_000_000, (100, 200), s.masks)
        assert got.error is None, got.error
        kept = Image.open(io.BytesIO(got.mask_png))
        assert kept.mode == "L" and np.array_equal(np.asarray(kept), np.asarray(got.request.mask))
        loaded.append(got)
    return loaded


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (image * 255).round().astype(np.uint8)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def reference_args(r, mask_png: bytes) -> dict:
    return dict(prompt=r.prompt, image=r.image, mask_image=Image.open(io.BytesIO(mask_png)), width=r.width,
                height=r.height, num_inference_steps=r.num_inference_steps, guidance_scale=r.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np")


def test_alpha_and_outpaint_rows_match_the_inpaint_pipeline(tiny):
    from diffusers import ZImageInpaintPipeline

    model, _, sources = tiny
    rows = [
        {"id": "alpha", "source": sources["a"], "prompt": "on a marble table", "mask": "alpha", "seed": 1},
        {"id": "alpha-grown", "source": sources["b"], "prompt": "on a beach", "mask": "alpha", "mask_grow": 3,
         "mask_blur": 2, "seed": 2},
        {"id": "outpaint", "source": sources["a"], "prompt": "wider", "outpaint": "96x64", "anchor": "left",
         "mask_grow": 4, "seed": 3},
        {"id": "aspect", "source": sources["c"], "prompt": "4:5 for a marketplace", "aspect": "4:5", "seed": 4},
    ]
    loaded = load(rows, settings())
    requests = [got.request for got in loaded]
    assert all(isinstance(r, EditRequest) and r.mode == "inpaint" for r in requests)
    assert [(r.width, r.height) for r in requests] == [(64, 64), (80, 64), (96, 64), (64, 80)]
    engine = EditEngine(str(model), "turbo", device="cpu")
    mixed = engine.generate(requests, batch_size=4)
    pipe = ZImageInpaintPipeline(**engine.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    for i, (got, r, image) in enumerate(zip(loaded, requests, mixed)):
        want = to_uint8(pipe(strength=r.strength, **reference_args(r, got.mask_png)).images[0])
        assert max_diff(image, want) <= TOLERANCE, f"row {rows[i]['id']}"


def test_a_controlnet_inpaint_row_with_a_derived_mask_matches_its_pipeline(tiny):
    from diffusers import ZImageControlNetInpaintPipeline

    from zimage_batch.inputs.control import ControlJob

    model, net, sources = tiny
    s = settings(mask="alpha", mask_grow=2)
    s = WorkerSettings(**{**s.__dict__, "control": ControlJob(str(net), control="tile", control_scale=0.75)})
    (got,) = load([{"id": "cn", "source": sources["b"], "prompt": "product on wood", "seed": 7}], s)
    r = got.request
    assert r.inpaint and r.mode == "controlnet-inpaint" and got.lineage["mask"] == "alpha"
    engine = ControlNetEngine(str(model), "turbo", controlnet_path=str(net), device="cpu")
    image = engine.generate([r])[0]
    pipe = ZImageControlNetInpaintPipeline(**engine.pipe.components, controlnet=engine.controlnet)
    pipe.set_progress_bar_config(disable=True)
    args = reference_args(r, got.mask_png)
    want = to_uint8(pipe(control_image=r.control_image, controlnet_conditioning_scale=0.75, **args).images[0])
    assert max_diff(image, want) <= TOLERANCE
