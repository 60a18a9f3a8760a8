"""Edit sources: every kind of image decodes upright in RGB or fails with its reason, the output size
follows the source, and rows asking what the model cannot do are refused before any work."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from source_images import cmyk_jpeg, encode, exif_rotated_jpeg, gray_png, palette_png, pattern, png16, rgba_png

from zimage_batch.inputs import images
from zimage_batch.model.variants import get_variant


def test_sources_decode_correctly():
    upright = images.decode(exif_rotated_jpeg(), "exif.jpg")
    assert upright.mode == "RGB" and upright.size == (64, 96)
    stored = np.asarray(Image.open(io.BytesIO(exif_rotated_jpeg())).convert("RGB")).astype(int)
    assert np.abs(np.asarray(upright).astype(int) - np.rot90(stored, k=-1)).mean() < 1  # rotated 90° clockwise

    palette = images.decode(palette_png(), "p.png")
    assert palette.mode == "RGB" and palette.size == (80, 64)
    stored = Image.open(io.BytesIO(palette_png()))
    assert stored.mode == "P" and np.array_equal(np.asarray(palette), np.asarray(stored.convert("RGB")))

    gray = np.asarray(images.decode(gray_png(), "g.png"))
    assert gray.shape == (64, 64, 3) and (gray[..., 0] == pattern(64, 64)[..., 0]).all() and (gray[..., 1] == gray[..., 2]).all()

    rgba = np.asarray(images.decode(rgba_png(), "a.png"))
    assert (rgba[:, :32] == 255).all() and (rgba[:, 32:] == pattern(64, 64)[:, 32:]).all()

    cmyk = np.asarray(images.decode(cmyk_jpeg(), "c.jpg")).astype(int)
    assert np.abs(cmyk - pattern(64, 64)).mean() < 4  # colours survive the CMYK round trip

    deep = np.asarray(images.decode(png16(), "d.png"))
    assert deep.shape == (80, 64, 3) and deep.max() == 255 and deep.min() == 0
    assert 100 < deep[40, 32, 0] < 160, "16-bit values are scaled, not clipped"

    with pytest.raises(images.SourceError, match="is not an image"):
        images.decode(b"id,prompt\n1,a cat\n", "x.csv")
    with pytest.raises(images.SourceError, match="corrupt or truncated"):
        images.decode(cmyk_jpeg()[:400], "t.jpg")
    with pytest.raises(images.SourceError, match="too large: big.png is 300x200 = 0.1 MP"):
        images.decode(encode(Image.new("RGB", (300, 200)), "PNG"), "big.png", max_pixels=50_000)


def test_output_size_follows_the_source():
    turbo = get_variant("turbo")
    assert images.output_size(1000, 750, turbo) == (1008, 752)
    assert images.output_size(4000, 3000, turbo) == (2048, 1536)  # scaled down, aspect kept
    assert images.output_size(40, 40, turbo) == (64, 64)  # scaled up to the smallest side
    assert images.output_size(1000, 500, turbo, width=512) == (512, 256)
    assert images.output_size(1000, 500, turbo, width=320, height=320) == (320, 320)


@pytest.mark.parametrize(
    "model, columns, problem",
    [
        ("tiny:turbo", {"mode": ["edit"]}, "column 'mode' asks for modes the turbo variant does not do"),
        ("tiny:turbo", {"mode": ["inpaint"]}, "column 'mask' is missing for inpaint rows"),
        ("tiny:omni", {"mask": ["m.png"]}, "column 'mode' asks for modes the omni variant does not do (it does edit)"),
        ("tiny:turbo", {"strength": [1.5]}, "column 'strength' must be in (0, 1]"),
    ],
)
def test_edit_manifest_refused_before_any_work(tmp_path, model, columns, problem):
    """Rows asking for what the model cannot do fail validation, naming the column, before a model loads."""
    from zimage_batch.inputs.manifest import ManifestError
    from zimage_batch.jobspec import JobSpec
    from zimage_batch.run.preflight import prepare

    manifest = tmp_path / "edits.parquet"
    pq.write_table(pa.table({"id": ["sku-1"], "source": ["a.jpg"], "prompt": ["red"], **columns}), manifest)
    with pytest.raises(ManifestError, match=re.escape(problem)):
        prepare(JobSpec(manifest=str(manifest), output=str(tmp_path / "out"), model=model))
    assert not (tmp_path / "out").exists()
