"""`zimage-batch make-tiny-model`: tiny random-init checkpoints in the official diffusers layout
loadable by diffusers' own pipelines, fast enough for tests and demos."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from zimage_batch.cli import main

VARIANTS = ["turbo", "base", "omni"]
COMPONENTS = ["transformer", "text_encoder", "tokenizer", "vae", "scheduler"]
OMNI_COMPONENTS = ["siglip", "siglip_processor"]
WEIGHTED = ["transformer", "text_encoder", "vae"]
CHINESE = "一只可爱的小猫坐在窗台上，阳光明媚，高清摄影"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One checkpoint per variant, each written through the CLI."""
    root = tmp_path_factory.mktemp("tiny-cli")
    runner = CliRunner()
    paths = {}
    for variant in VARIANTS:
        path = root / variant
        result = runner.invoke(main, ["make-tiny-model", str(path), "--variant", variant])
        assert result.exit_code == 0, result.output
        assert str(path) in result.output
        paths[variant] = path
    return paths


def _load(pipeline_class: str, path: Path, **kwargs):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = getattr(diffusers, pipeline_class).from_pretrained(str(path), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("variant", VARIANTS)
def test_folder_layout(built, variant):
    path = built[variant]
    index = json.loads((path / "model_index.json").read_text())
    expected = COMPONENTS + (OMNI_COMPONENTS if variant == "omni" else [])
    for name in expected:
        assert (path / name).is_dir(), f"{name}/ missing"
        assert name in index, f"{name} not in model_index.json"
    assert index["_class_name"] == ("ZImageOmniPipeline" if variant == "omni" else "ZImagePipeline")
    if variant != "omni":
        assert not any(name in index for name in OMNI_COMPONENTS)

    files = [p for p in path.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights
    for name in WEIGHTED + (["siglip"] if variant == "omni" else []):
        assert list((path / name).glob("*.safetensors")), f"{name}/ has no safetensors weights"
    assert (path / "scheduler" / "scheduler_config.json").is_file()
    assert "draws noise" in (path / "README.md").read_text()


def test_tokenizer_has_chat_template_and_handles_chinese(built):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built["turbo"] / "tokenizer")
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHINESE}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert "<|im_start|>user" in text and CHINESE in text and text.rstrip().endswith("assistant")
    ids = tokenizer(CHINESE).input_ids
    assert ids and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == CHINESE
    assert tokenizer.pad_token is not None


@pytest.mark.parametrize("variant", ["turbo", "base"])
def test_loads_with_zimage_pipeline(built, variant):
    pipe = _load("ZImagePipeline", built[variant])
    image = pipe(
        prompt=CHINESE,
        width=64,
        height=96,
        num_inference_steps=2,
        guidance_scale=4.0 if variant == "base" else 0.0,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (96, 64, 3) and np.isfinite(image).all()


def test_omni_loads_and_edits(built):
    from PIL import Image

    # diffusers' omni pipeline casts reference images to bf16 itself, so it runs in bf16.
    pipe = _load("ZImageOmniPipeline", built["omni"], torch_dtype=torch.bfloat16)
    assert type(pipe.siglip).__name__ == "Siglip2VisionModel"
    reference = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    common = dict(num_inference_steps=2, guidance_scale=4.0, output_type="np")
    edited = pipe(
        image=[reference], prompt="make it blue", height=64, width=64,
        generator=torch.Generator("cpu").manual_seed(0), **common,
    ).images[0]
    assert edited.shape == (64, 64, 3) and np.isfinite(edited).all()
    drawn = pipe(
        prompt="a cat", height=64, width=96, generator=torch.Generator("cpu").manual_seed(0), **common
    ).images[0]
    assert drawn.shape == (64, 96, 3) and np.isfinite(drawn).all()
