"""The ControlNet engine against diffusers' own pipelines (issue 18).

Rows with a given condition at scales 0.4 / 0.75 / 1.0 against `ZImageControlNetPipeline`,
ControlNet-inpaint rows against `ZImageControlNetInpaintPipeline`, rows without a condition in
the same call against `ZImagePipeline`: on CPU fp32, mixed in one batch and alone, within 1/255.
Tiny checkpoints of every published shape (1.0: 16 input channels; 2.0 and 2.1: 33, padded) load
from a single file and from a diffusers folder, run, and change the pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import save_file

from zimage_batch.generate.controlnet import ControlNetEngine
from zimage_batch.generate.requests import ControlRequest, GenerationRequest
from zimage_batch.inputs.conditions import fit
from zimage_batch.model.checkpoint import ModelSourceError
from zimage_batch.model.controlnet import single_file_config
from zimage_batch.model.tiny import make_tiny_model
from zimage_batch.model.tiny_controlnet import make_tiny_controlnet

TOLERANCE = 1  # 1/255

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gradient(width: int, height: int, phase: int = 0) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, (y * 7 + phase) % 256, (x * 3 + y + phase * 11) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def box_mask(width: int, height: int) -> Image.Image:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 3 :] = 255
    return Image.fromarray(mask, "L")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-controlnet")
    models = {v: make_tiny_model(root / v, v, seed=seed) for seed, v in enumerate(("turbo", "base"))}
    nets = {v: make_tiny_controlnet(root / f"net-{v}.safetensors", v, seed=3) for v in ("1.0", "2.0", "2.1")}
    nets["2.1-folder"] = make_tiny_controlnet(root / "net-2.1-folder", "2.1", seed=4, folder=True)
    return models, nets


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (image * 255).round().astype(np.uint8)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def control_row(seed, scale, size, condition, guidance, negative=None, mask=None, source=None, steps=4):
    """A request whose pixels are prepared on the CPU as the worker does (`fit`: Lanczos to the output size)."""
    width, height = size
    return ControlRequest(
        f"a product on a table, take {seed}", seed, width, height, steps, guidance, control_scale=scale,
        inpaint=mask is not None, control_image=fit(condition, width, height),
        image=None if source is None else fit(source, width, height),
        mask=None if mask is None else fit(mask, width, height), negative_prompt=negative,
    )


@pytest.mark.parametrize("variant, guidance", [("turbo", 0.0), ("base", 4.0)])
def test_control_rows_match_the_controlnet_pipelines(checkpoints, variant, guidance):
    from diffusers import ZImageControlNetInpaintPipeline, ZImageControlNetPipeline

    models, nets = checkpoints
    engine = ControlNetEngine(str(models[variant]), variant, controlnet_path=str(nets["2.1"]), device="cpu")
    conditions = [gradient(80, 60, i) for i in range(6)]  # not the output size: resized like the reference
    rows = [
        control_row(10, 0.4, (64, 64), conditions[0], guidance),
        control_row(11, 0.75, (64, 64), conditions[1], guidance, negative="blurry"),
        control_row(12, 1.0, (64, 64), conditions[2], guidance),
        control_row(13, 0.75, (64, 64), conditions[3], guidance),  # shares a batch with row 1
        control_row(14, 0.75, (80, 64), conditions[4], guidance),  # another size
        control_row(20, 0.75, (64, 64), conditions[5], guidance, mask=box_mask(64, 64), source=gradient(64, 64, 9)),
        control_row(21, 0.75, (64, 64), conditions[0], guidance, mask=box_mask(90, 70), source=gradient(90, 70, 8),
                    negative="ugly"),
        GenerationRequest("a product on a table, plain", 30, 64, 64, 4, guidance),
        GenerationRequest("another plain one", 31, 64, 64, 4, guidance, negative_prompt="dark"),
    ]
    mixed = engine.generate(rows, batch_size=8)
    parts = engine.pipe.components  # the reference pipelines share the engine's loaded modules
    control = ZImageControlNetPipeline(**parts, controlnet=engine.controlnet)
    inpaint = ZImageControlNetInpaintPipeline(**parts, controlnet=engine.controlnet)
    for pipe in (control, inpaint, engine.pipe):
        pipe.set_progress_bar_config(disable=True)
    for i, (r, got) in enumerate(zip(rows, mixed)):
        args = dict(prompt=r.prompt, width=r.width, height=r.height, num_inference_steps=r.num_inference_steps,
                    guidance_scale=r.guidance_scale, negative_prompt=r.negative_prompt,
                    generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np")
        if isinstance(r, GenerationRequest):
            out = engine.pipe(**args)
        elif r.inpaint:
            original = (gradient(64, 64, 9), box_mask(64, 64)) if i == 5 else (gradient(90, 70, 8), box_mask(90, 70))
            out = inpaint(image=original[0], mask_image=original[1], control_image=conditions[5 if i == 5 else 0],
                          controlnet_conditioning_scale=r.control_scale, **args)
        else:
            out = control(control_image=conditions[i], controlnet_conditioning_scale=r.control_scale, **args)
        want = to_uint8(out.images[0])
        assert got.shape == (r.height, r.width, 3)
        assert max_diff(got, want) <= TOLERANCE, f"{variant} row {i} in a mixed batch"
        if i in (0, 5):
            assert max_diff(engine.generate([r])[0], want) <= TOLERANCE, f"{variant} row {i} alone"


@pytest.mark.parametrize("net, width", [("1.0", 16), ("2.0", 33), ("2.1", 33), ("2.1-folder", 33)])
def test_every_controlnet_shape_loads_runs_and_changes_the_pixels(checkpoints, net, width):
    from diffusers import ZImageControlNetPipeline

    models, nets = checkpoints
    engine = ControlNetEngine(str(models["turbo"]), "turbo", controlnet_path=str(nets[net]), device="cpu")
    assert engine.controlnet.config.control_in_dim == width
    mode = {"1.0": None, "2.0": "control_layers"}.get(net, "control_noise_refiner")
    assert engine.controlnet.config.add_control_noise_refiner == mode
    conditions = [gradient(64, 64), ImageOps.invert(gradient(64, 64).transpose(Image.Transpose.ROTATE_90))]
    rows = [control_row(5, 0.75, (64, 64), condition, 0.0) for condition in conditions]
    rows.append(GenerationRequest(rows[0].prompt, 5, 64, 64, 4, 0.0))  # the same row without a condition
    first, other, plain = engine.generate(rows)
    assert max_diff(first, plain) > 20 and max_diff(first, other) > 20, "the condition must move the pixels"
    pipe = ZImageControlNetPipeline(**engine.pipe.components, controlnet=engine.controlnet)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(prompt=rows[0].prompt, control_image=rows[0].control_image, width=64, height=64, num_inference_steps=4,
                guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]
    assert max_diff(first, to_uint8(want)) <= TOLERANCE
    inpaint = control_row(6, 0.75, (64, 64), gradient(64, 64), 0.0, mask=box_mask(64, 64), source=gradient(64, 64, 3))
    if width == 16:  # a 1.0 ControlNet has no inputs for the mask and the masked source
        with pytest.raises(ValueError, match="ControlNet inpaint needs a 2.x ControlNet"):
            engine.generate([inpaint])
    else:
        assert engine.generate([inpaint])[0].shape == (64, 64, 3)


def _fake_published(path, layers: int, in_dim: int, refiner: str | None) -> str:
    """A file with the keys and the shapes that matter of a published checkpoint (a 30-layer,
    dim-3840 model), the rest left out: enough for the config to be read off it."""
    small = lambda: torch.zeros(1)  # noqa: E731 - safetensors stores no tensor twice
    tensors = {"control_all_x_embedder.2-1.weight": torch.zeros(3840, 4 * in_dim)}
    tensors |= {f"control_layers.{i}.attention.to_q.weight": small() for i in range(layers)}
    if refiner == "plain":
        tensors |= {f"control_noise_refiner.{i}.attention.to_q.weight": small() for i in range(2)}
    elif refiner is not None:
        before = torch.zeros(4, 4) if refiner == "zero" else torch.ones(4, 4)
        tensors |= {"control_noise_refiner.0.before_proj.weight": before, "control_noise_refiner.1.after_proj.weight": small()}
    save_file(tensors, path)
    return str(path)


def test_the_published_single_files_are_told_apart(tmp_path):
    """1.0, 2.0 and 2.1 as diffusers' own `infer_diffusers_model_type` tells them apart, with the
    layer places of their published configs."""
    turbo = dict(n_layers=30, n_refiner_layers=2, dim=3840, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
                 all_patch_size=[2], all_f_patch_size=[1])
    v1 = single_file_config(_fake_published(tmp_path / "1.safetensors", 6, 16, "plain"), turbo)
    assert (v1["control_in_dim"], v1["add_control_noise_refiner"], v1["control_refiner_layers_places"]) == (16, None, None)
    assert v1["control_layers_places"] == [0, 5, 10, 15, 20, 25]
    v20 = single_file_config(_fake_published(tmp_path / "20.safetensors", 15, 33, "zero"), turbo)
    assert (v20["control_in_dim"], v20["add_control_noise_refiner"]) == (33, "control_layers")
    assert v20["control_layers_places"] == list(range(0, 30, 2)) and v20["control_refiner_layers_places"] == [0, 1]
    v21 = single_file_config(_fake_published(tmp_path / "21.safetensors", 15, 33, "trained"), turbo)
    assert v21["add_control_noise_refiner"] == "control_noise_refiner" and v21["n_refiner_layers"] == 2
    with pytest.raises(ModelSourceError, match="do not spread evenly"):
        single_file_config(_fake_published(tmp_path / "odd.safetensors", 7, 33, "trained"), turbo)
    save_file({"something.else": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ModelSourceError, match="not a Z-Image ControlNet"):
        single_file_config(str(tmp_path / "other.safetensors"), turbo)
