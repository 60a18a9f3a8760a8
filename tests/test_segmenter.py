"""Masks from words (issue 28): `make-tiny-model DIR --segmenter` writes a CLIPSeg that
transformers loads; the worker's batched CLIPSeg masks equal those computed with transformers
directly, row by row; words rows get their mask (threshold, invert, grow), and an empty one is
an error row naming the source."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cli_in_process import cli_in_process
from PIL import Image

from zimage_batch.generate.requests import EditRequest
from zimage_batch.generate.segmenter import Segmenter
from zimage_batch.inputs.mask_spec import MaskJob, row_mask
from zimage_batch.model.variants import get_variant
from zimage_batch.run.loading import EditRow, complete_words, load_edit_row

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_segmenter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seg") / "clipseg"
    result = cli_in_process("make-tiny-model", str(folder), "--segmenter")
    assert result.returncode == 0, result.stderr[-2000:]
    return str(folder)


def photo(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def direct(folder: str, image: Image.Image, prompt: str) -> np.ndarray:
    """One row's probabilities as transformers computes them, alone."""
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    processor = CLIPSegProcessor.from_pretrained(folder)
    model = CLIPSegForImageSegmentation.from_pretrained(folder).eval()
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    probability = torch.sigmoid(logits.reshape(1, 1, *logits.shape[-2:]))
    return torch.nn.functional.interpolate(probability, size=(image.height, image.width), mode="bilinear",
                                           align_corners=False)[0, 0].numpy()


def test_batched_masks_equal_transformers_directly(tiny_segmenter):
    rows = [(photo(64, 64, 1), "the background"), (photo(90, 70, 2), "a red bottle on a table"),
            (photo(48, 80, 3), "shoes")]
    found = Segmenter(tiny_segmenter).probabilities([image for image, _ in rows], [words for _, words in rows])
    for (image, words), probability in zip(rows, found):
        want = direct(tiny_segmenter, image, words)
        assert probability.shape == (image.height, image.width)
        assert np.abs(probability - want).max() < 1e-5, words
        clear = np.abs(want - 0.4) > 1e-4  # away from the threshold, the masks are the same
        assert ((probability >= 0.4) == (want >= 0.4))[clear].all()
        assert 0 < (want >= 0.4).mean() < 1  # the tiny model's masks are neither empty nor full


def test_words_rows_get_their_mask_or_an_error(tiny_segmenter, tmp_path):
    source = tmp_path / "product.png"
    photo(80, 64, 5).save(source)
    segmenter = Segmenter(tiny_segmenter)
    template = EditRequest("on a beach", 1, None, None, 3, 0.0, "inpaint")
    want = direct(tiny_segmenter, photo(80, 64, 5), "the background")

    def load(**row) -> EditRow:
        spec = row_mask({"mask_prompt": "the background", **row}, MaskJob())
        loaded = load_edit_row(template, str(source), None, get_variant("turbo"), spec=spec, keep=True)
        assert loaded.error is None and loaded.segment is not None and loaded.request.mask is None
        image, _ = loaded.segment
        return complete_words(loaded, segmenter.probabilities([image], ["the background"])[0])

    plain, inverted = load(), load(mask_invert=True)
    assert plain.error is None and plain.segment is None and plain.lineage["mask"] == "words"
    assert (plain.lineage["mask_prompt"], plain.lineage["mask_threshold"]) == ("the background", 0.4)
    mask = np.asarray(plain.request.mask)
    assert mask.shape == (64, 80) and np.array_equal(mask > 127, want >= 0.4)
    assert np.array_equal(np.asarray(inverted.request.mask) > 127, want < 0.4)
    assert plain.mask_png and len(plain.lineage["mask_sha256"]) == 64
    grown = np.asarray(load(mask_grow=2).request.mask) > 127
    assert grown.sum() > (mask > 127).sum()
    empty = load(mask_threshold=1.0)
    assert empty.request is None and empty.error == (
        f"the derived mask is empty, nothing to repaint (words: CLIPSeg finds no 'the background' at threshold 1): "
        f"{source}")
