"""The batched Engine against diffusers' own ZImagePipeline.

For every row: the Engine's pixels, in a mixed batch and alone, are within 1/255 of
`ZImagePipeline.from_pretrained(tiny_dir)(...)` with the same prompt, settings and seed.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from zimage_batch.generate.engine import MAX_SEQUENCE_LENGTH, Engine
from zimage_batch.generate.requests import GenerationRequest
from zimage_batch.model.tiny import make_tiny_model

TOLERANCE = 1  # 1/255

LONG_PROMPT = ", ".join(
    ["a watercolor painting of mountains at sunrise with mist over a quiet lake"] * 60
    + ["and at the very end a tiny red boat"]
)
CHINESE_PROMPT = "一只可爱的小猫坐在窗台上，阳光明媚，高清摄影"

# No CFG (the turbo recipe): sizes, seeds, languages and prompt lengths mixed in one batch.
# Several rows share a shape so that they really run together, padded to different lengths.
NO_CFG_ROWS = [
    GenerationRequest("a photo of a cat sitting on a red sofa", 1, 64, 64, 9, 0.0),
    GenerationRequest(CHINESE_PROMPT, 2, 64, 64, 9, 0.0),
    GenerationRequest(LONG_PROMPT, 3, 64, 64, 9, 0.0),
    GenerationRequest("a photo of a cat sitting on a red sofa", 4, 64, 64, 9, 0.0),  # seed differs only
    GenerationRequest("portrait of an astronaut", 5, 96, 64, 9, 0.0),
    GenerationRequest(CHINESE_PROMPT, 6, 96, 64, 9, 0.0),
    GenerationRequest("东京的夜景 neon lights in the rain", 7, 64, 128, 9, 0.0),
    GenerationRequest("a red apple", 8, 64, 128, 5, 0.0),
]

# CFG on (the base recipe): negative prompts, truncation, normalisation, mixed with CFG off.
CFG_ROWS = [
    GenerationRequest("a dog on the grass", 11, 64, 64, 6, 4.0, negative_prompt="blurry, low quality"),
    GenerationRequest(CHINESE_PROMPT, 12, 64, 64, 6, 4.0, negative_prompt="模糊"),
    GenerationRequest("a dog on the grass", 13, 64, 64, 6, 4.0),  # no negative prompt: ""
    GenerationRequest(LONG_PROMPT, 14, 64, 64, 6, 4.0, negative_prompt=LONG_PROMPT[:200]),
    GenerationRequest("a lighthouse", 15, 96, 64, 6, 4.0, negative_prompt="people", cfg_truncation=0.5),
    GenerationRequest("a lighthouse", 16, 96, 64, 6, 4.0, negative_prompt="people", cfg_truncation=0.5),
    GenerationRequest("a lighthouse", 17, 64, 128, 6, 4.0, negative_prompt="fog", cfg_normalization=1.0),
    GenerationRequest(
        "a lighthouse at night", 18, 64, 128, 6, 4.0, negative_prompt="fog", cfg_truncation=0.7, cfg_normalization=0.5
    ),
    GenerationRequest("a small boat", 19, 64, 64, 6, 0.0, negative_prompt="ignored without CFG"),
]

VARIANT_ROWS = {"turbo": NO_CFG_ROWS + CFG_ROWS[:3], "base": CFG_ROWS + NO_CFG_ROWS[:3]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-parity")
    # Different seeds so the two variants do not share weights.
    return {
        "turbo": make_tiny_model(root / "turbo", "turbo", seed=0),
        "base": make_tiny_model(root / "base", "base", seed=1),
    }


@pytest.fixture(scope="module", params=["turbo", "base"])
def setup(request, checkpoints):
    """(variant, engine, reference pipeline, mixed-batch outputs) for one variant."""
    from diffusers import ZImagePipeline

    variant = request.param
    path = str(checkpoints[variant])
    engine = Engine(path, variant, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = ZImagePipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    rows = VARIANT_ROWS[variant]
    mixed = engine.generate(rows, batch_size=8)
    return variant, engine, pipe, rows, mixed


def reference(pipe, r: GenerationRequest) -> np.ndarray:
    image = pipe(
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
    return (image * 255).round().astype(np.uint8)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_long_prompt_exceeds_truncation(checkpoints):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoints["turbo"] / "tokenizer")
    assert len(tokenizer(LONG_PROMPT).input_ids) > MAX_SEQUENCE_LENGTH


def test_mixed_batch_matches_reference(setup):
    variant, _, pipe, rows, mixed = setup
    assert len(mixed) == len(rows)
    for i, (row, got) in enumerate(zip(rows, mixed)):
        assert got.dtype == np.uint8 and got.shape == (row.height, row.width, 3)
        want = reference(pipe, row)
        assert max_diff(got, want) <= TOLERANCE, f"{variant} row {i} ({row}) differs from ZImagePipeline"


def test_batch_invariance(setup):
    """A row alone gives the pixels it gets inside a mixed batch (and batch size does not matter)."""
    variant, engine, _, rows, mixed = setup
    for i, row in enumerate(rows):
        alone = engine.generate([row], batch_size=1)[0]
        assert max_diff(alone, mixed[i]) <= TOLERANCE, f"{variant} row {i} depends on its batch"
    small_batches = engine.generate(rows[::-1], batch_size=2)[::-1]
    for i, (a, b) in enumerate(zip(small_batches, mixed)):
        assert max_diff(a, b) <= TOLERANCE, f"{variant} row {i} depends on batch size/order"


def test_rows_differ(setup):
    """Sanity: seeds, prompts and guidance matter (the comparison is not vacuous)."""
    _, _, _, rows, mixed = setup
    images = {i: img for i, img in enumerate(mixed) if rows[i].width == rows[i].height == 64}
    keys = list(images)
    for a in range(len(keys)):
        for b in range(a + 1, len(keys)):
            assert max_diff(images[keys[a]], images[keys[b]]) > TOLERANCE


def test_turbo_default_is_its_distilled_8_nfe_schedule(checkpoints):
    """The model card: Turbo runs "9 scheduler steps = 8 NFE". That is diffusers' count before 0.39,
    whose 9th step sat at sigma 0 and changed nothing. The same schedule is 8 steps now, so the
    default is 8: 8 transformer passes on exactly the old 9-step sigmas, less the wasted one."""
    from zimage_batch.model.variants import get_variant

    steps = get_variant("turbo").num_inference_steps
    assert steps == 8
    engine = Engine(str(checkpoints["turbo"]), "turbo", device="cpu")
    latents = torch.zeros(1, 16, 8, 8)
    scheduler, timesteps = engine.retrieve_timesteps(latents, steps)

    old = copy.deepcopy(engine.pipe.scheduler)  # what ZImagePipeline did with 9 steps up to 0.38
    old.sigma_min = 0.0
    assert not old.config.use_dynamic_shifting  # Turbo's static shift 3: no resolution term
    old.set_timesteps(9)
    assert old.sigmas[-2] == old.sigmas[-1] == 0  # its last step moves by 0
    torch.testing.assert_close(scheduler.sigmas, old.sigmas[:-1], atol=1e-6, rtol=0)

    calls = []
    hook = engine.pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        engine.generate([GenerationRequest("a cat", 1, 64, 64, steps, 0.0)])
    finally:
        hook.remove()
    assert len(calls) == len(timesteps) == 8


def test_low_vram_encodes_ahead_then_denoises_from_the_cache(setup, checkpoints):
    """low_vram: one turn of the text encoder for all prompts, then one of the transformer;
    the pixels match those with both on the device (within 1/255: prompts are padded in other groups)."""
    variant, _, pipe, rows, mixed = setup
    engine = Engine(str(checkpoints[variant]), variant, device="cpu", low_vram=True)
    engine.encode_ahead(rows)
    assert engine.swaps == 1  # the text encoder came in
    images = engine.generate(rows, batch_size=8)
    assert engine.swaps == 2  # and the transformer went back, once for every batch
    for image, expected in zip(images, mixed):
        assert max_diff(image, expected) <= TOLERANCE
    # A prompt that was not encoded ahead still works (the text encoder takes one more turn).
    extra = GenerationRequest("not encoded ahead", 99, 64, 64, 9, 0.0)
    assert max_diff(engine.generate([extra])[0], reference(pipe, extra)) <= TOLERANCE
    assert engine.swaps == 4


def test_low_vram_cache_serves_two_shards_at_once(checkpoints):
    """A worker runs two shards at once: the second shard's encoding ahead must not evict the
    first's prompts (that would swap the models for every batch), and releasing one shard
    keeps the prompts the other still needs."""
    engine = Engine(str(checkpoints["turbo"]), "turbo", device="cpu", low_vram=True)
    shard_a, shard_b = NO_CFG_ROWS[:3], NO_CFG_ROWS[4:8]  # one prompt (Chinese) is in both
    engine.encode_ahead(shard_a)
    engine.encode_ahead(shard_b)
    assert engine.swaps == 1
    engine.generate(shard_a, batch_size=2)
    engine.generate(shard_b, batch_size=2)
    assert engine.swaps == 2  # only the transformer's way back
    cached = len(engine.turns._cache)
    engine.release_prompts(shard_a)
    shared = {engine._template(r.prompt) for r in shard_b}
    assert {text for text, _ in engine.turns._cache} == shared and len(engine.turns._cache) < cached
    engine.release_prompts(shard_b)
    assert engine.turns._cache == {} and engine.turns._users == {}


def test_low_vram_failures_leave_a_consistent_state(checkpoints, monkeypatch):
    """A swap that fails half-way is redone in full next time; encoding ahead that fails
    half-way leaves no entries or counts behind (and takes none from another shard)."""
    engine = Engine(str(checkpoints["turbo"]), "turbo", device="cpu", low_vram=True)
    other_shard = NO_CFG_ROWS[:2]
    engine.encode_ahead(other_shard)
    before = (dict(engine.turns._users), set(engine.turns._cache))

    real_run = engine._run_text_encoder
    calls = {"n": 0}

    def fails_on_second_chunk(texts, pad_to_max):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_run(texts, pad_to_max)

    monkeypatch.setattr(engine, "_run_text_encoder", fails_on_second_chunk)
    with pytest.raises(torch.OutOfMemoryError):
        engine.encode_ahead(NO_CFG_ROWS[1:], batch_size=2)  # shares a prompt with other_shard
    assert (dict(engine.turns._users), set(engine.turns._cache)) == before
    monkeypatch.undo()

    real_to = engine.pipe.text_encoder.to

    def fails_once(*args, **kwargs):
        monkeypatch.setattr(engine.pipe.text_encoder, "to", real_to)
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    engine._bring("transformer")
    monkeypatch.setattr(engine.pipe.text_encoder, "to", fails_once)
    with pytest.raises(torch.OutOfMemoryError):
        engine._bring("text_encoder")
    assert engine.turns._resident == ""  # not "transformer": the next swap must not be skipped
    engine._bring("transformer")
    assert engine.turns._resident == "transformer"
