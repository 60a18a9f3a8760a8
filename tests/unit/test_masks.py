"""Derived masks and outpainting (issue 28), without a model: the mask pixels (alpha, grow,
blur, canvas, anchor, aspect), the per-row errors, the settings refused before any work, the
fingerprint of jobs without them, and the mask kept beside the output in every format."""

from __future__ import annotations

import io
import re
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from zimage_batch.generate.requests import EditRequest
from zimage_batch.inputs import masks
from zimage_batch.inputs.manifest import ManifestError
from zimage_batch.inputs.mask_spec import MaskJob, RowMask, row_mask
from zimage_batch.jobspec import JobError, JobSpec
from zimage_batch.model.variants import get_variant
from zimage_batch.output.writers import make_writer
from zimage_batch.run.loading import load_edit_row
from zimage_batch.storage import open_storage

TURBO = get_variant("turbo")


def rgba(width: int, height: int, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Red; transparent but for the opaque `box` (x0, y0, x1, y1)."""
    pixels = np.zeros((height, width, 4), np.uint8)
    pixels[..., 0] = 200
    if box:
        x0, y0, x1, y1 = box
        pixels[y0:y1, x0:x1, 3] = 255
    return Image.fromarray(pixels, "RGBA")


def test_alpha_mask_grow_and_blur():
    image = rgba(40, 30, (10, 10, 30, 20))
    mask = np.asarray(masks.alpha_mask(image, "x.png"))
    assert mask[15, 20] == 0 and mask[0, 0] == 255 and mask[15, 9] == 255  # transparent repaints
    grown = np.asarray(masks.refine(Image.fromarray(255 - mask), 3, 0))  # grow the opaque box: 3 px wider
    assert grown[15, 7] == 255 and grown[15, 6] == 0 and grown[15, 32] == 255 and grown[15, 33] == 0
    shrunk = np.asarray(masks.refine(Image.fromarray(255 - mask), -3, 0))
    assert shrunk[15, 12] == 0 and shrunk[15, 13] == 255
    blurred = np.asarray(masks.refine(Image.fromarray(mask), 0, 2))
    assert 0 < blurred[15, 10] < 255 and blurred[0, 0] == 255 and blurred[15, 20] < 16
    with pytest.raises(masks.MaskError, match="no alpha channel .*: x.jpg"):
        masks.alpha_mask(Image.new("RGB", (8, 8)), "x.jpg")


@pytest.mark.parametrize("anchor, where", [("center", (10, 5)), ("top", (10, 0)), ("bottom", (10, 10)),
                                           ("left", (0, 5)), ("right", (20, 5))])
def test_outpaint_canvas_anchor_and_fill(anchor, where):
    source = Image.fromarray(np.arange(30 * 20 * 3, dtype=np.uint8).reshape(20, 30, 3) % 250 + 1, "RGB")
    canvas, mask = masks.outpaint(source, RowMask("outpaint", canvas=(50, 30), anchor=anchor), "s.png")
    x, y = where
    pixels, mask = np.asarray(canvas), np.asarray(mask)
    assert canvas.size == mask.shape[::-1] == (50, 30)
    assert np.array_equal(pixels[y : y + 20, x : x + 30], np.asarray(source))
    assert (mask[y : y + 20, x : x + 30] == 0).all() and mask.sum() == 255 * (50 * 30 - 30 * 20)
    # the new area repeats the nearest source pixel
    assert np.array_equal(pixels[0, 0], np.asarray(source)[0, 0]) and np.array_equal(pixels[-1, -1], np.asarray(source)[-1, -1])


def test_aspect_canvas_sizes():
    spec = RowMask("outpaint", aspect="4:5")
    assert masks.canvas_size(100, 100, spec, "s") == (100, 125)  # 1:1 to 4:5: taller
    assert masks.canvas_size(80, 200, spec, "s") == (160, 200)  # narrower than 4:5: wider
    assert masks.canvas_size(80, 100, spec, "s") == (80, 100)  # already 4:5: nothing added
    with pytest.raises(masks.MaskError, match=re.escape("outpaint 90x90 is smaller than the source (100x80): s")):
        masks.canvas_size(100, 80, RowMask("outpaint", canvas=(90, 90)), "s")


def test_rows_load_with_their_derived_mask_or_an_error(tmp_path):
    cut, opaque, plain = tmp_path / "cut.png", tmp_path / "opaque.png", tmp_path / "plain.jpg"
    rgba(100, 80, (30, 20, 70, 60)).save(cut)
    rgba(64, 64, (0, 0, 64, 64)).save(opaque)
    Image.new("RGB", (64, 64), "blue").save(plain)
    template = EditRequest("p", 1, None, None, 4, 0.0, "inpaint")

    def load(path, **row):
        return load_edit_row(template, str(path), None, TURBO, spec=row_mask(row, MaskJob()), keep=True)

    got = load(cut, mask="alpha", mask_grow=2)
    assert got.error is None and (got.request.width, got.request.height) == (96, 80)
    assert got.lineage["mask"] == "alpha" and got.lineage["mask_grow"] == 2 and len(got.lineage["mask_sha256"]) == 64
    got = load(cut, outpaint="160x80", anchor="right")  # output: the canvas, sized for the model
    assert got.error is None and (got.request.width, got.request.height) == (160, 80)
    assert got.lineage["outpaint"] == "160x80" and got.lineage["anchor"] == "right"
    assert np.asarray(got.request.mask)[:, :50].min() == 255 and np.asarray(got.request.mask)[:, 70:].max() == 0
    assert "no alpha channel" in load(plain, mask="alpha").error
    assert load(opaque, mask="alpha").error == (
        f"the derived mask is empty, nothing to repaint (alpha: the source is opaque): {opaque}")
    assert "nothing to repaint (outpaint" in load(cut, aspect="5:4").error
    assert load(cut, outpaint="64x64").error == f"outpaint 64x64 is smaller than the source (100x80): {cut}"


def test_job_settings_check_and_fingerprint():
    plain = JobSpec(manifest="m", output="o")
    assert plain.fingerprint() == JobSpec(manifest="m", output="o", mask_grow=0, anchor=None).fingerprint()
    assert JobSpec(manifest="m", output="o", mask="alpha").fingerprint() != plain.fingerprint()
    assert JobSpec(manifest="m", output="o", mask="alpha", mask_grow=4).fingerprint() != \
        JobSpec(manifest="m", output="o", mask="alpha").fingerprint()
    for settings, problem in [({"mask": "m.png"}, "may only be 'alpha'"), ({"outpaint": "10x", }, "outpaint must be WxH"),
                              ({"aspect": "4:0"}, "aspect must be W:H"), ({"anchor": "middle"}, "anchor must be one of"),
                              ({"outpaint": "64x64", "aspect": "1:1"}, "set one of them"),
                              ({"mask": "alpha", "aspect": "1:1"}, "set one of them"),
                              ({"mask_blur": -1}, "mask_blur must be in"),
                              ({"mask": "alpha", "mask_prompt": "the sky"}, "set one of them"),
                              ({"mask_threshold": 2.0}, "mask_threshold must be in 0..1")]:
        with pytest.raises(JobError, match=re.escape(problem)):
            JobSpec(manifest="m", output="o", **settings).validate()


@pytest.mark.parametrize("columns, job, problem", [
    ({"mask": ["m.png"], "outpaint": ["96x96"]}, {}, "column 'mask' is set on rows that are also outpainted"),
    ({"outpaint": ["96x96"], "aspect": ["1:1"]}, {}, "column 'outpaint' and 'aspect' are both set"),
    ({"outpaint": ["96"]}, {}, "column 'outpaint' must be WxH"),
    ({"aspect": ["wide"]}, {}, "column 'aspect' must be W:H"),
    ({"aspect": ["1:40"]}, {}, "column 'aspect' must be W:H"),
    ({"anchor": ["middle"]}, {}, "column 'anchor' must be one of center|top|bottom|left|right"),
    ({"mask_grow": [5000]}, {}, "column 'mask_grow' must be in"),
    ({"mask": ["alpha"], "mode": ["img2img"]}, {}, "column 'mode' asks for img2img or edit on rows whose mask is derived"),
    ({"mask": ["m.png"]}, {"aspect": "4:5"}, "column 'mask' is set on rows that are also outpainted"),
    ({"mask": ["alpha"], "mask_prompt": ["the background"]}, {}, "column 'mask_prompt' is set on rows that also have a mask"),
    ({"mask_prompt": ["the sky"], "outpaint": ["96x96"]}, {}, "column 'mask_prompt' is set on rows that are also outpainted"),
    ({"mask_prompt": ["the sky"], "mask_threshold": [1.5]}, {}, "column 'mask_threshold' must be in 0..1"),
])
def test_bad_mask_settings_refused_before_any_work(tmp_path, columns, job, problem):
    from zimage_batch.run.preflight import check_manifest

    manifest = tmp_path / "edits.parquet"
    pq.write_table(pa.table({"id": ["sku-1"], "source": ["a.png"], "prompt": ["red"], **columns}), manifest)
    with pytest.raises(ManifestError, match=re.escape(problem)):
        check_manifest(JobSpec(manifest=str(manifest), output=str(tmp_path / "out"), model="tiny:turbo", **job))


def test_mask_settings_on_a_prompt_manifest_refused(tmp_path):
    from zimage_batch.run.preflight import check_manifest

    manifest = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["red"]}), manifest)
    with pytest.raises(JobError, match="is a prompt manifest"):
        check_manifest(JobSpec(manifest=str(manifest), output="o", model="tiny:turbo", mask="alpha"))
    pq.write_table(pa.table({"id": ["a"], "prompt": ["red"], "outpaint": ["96x96"]}), manifest)
    with pytest.raises(ManifestError, match="column 'outpaint' belongs to edit manifests"):
        check_manifest(JobSpec(manifest=str(manifest), output="o", model="tiny:turbo"))


@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_the_mask_is_kept_beside_the_output(tmp_path, fmt):
    from zimage_batch.metadata_schema import metadata_columns
    from zimage_batch.output.features import sample_fields

    storage = open_storage(str(tmp_path))
    mask = masks.mask_png(Image.new("L", (8, 8), 255))
    fields = sample_fields(pa.schema(list(metadata_columns(True, masks=True).items())))
    writer = make_writer(fmt, storage, "s0", fields=fields)
    image = masks.mask_png(Image.new("L", (8, 8), 0))
    writer.add("k1", image, {"id": "1", "mask_sha256": "abc"}, mask=mask)
    writer.add("k2", image, {"id": "2"})
    writer.close()
    if fmt == "files":
        assert storage.get_bytes("images/s0/k1.mask.png") == mask
        assert not storage.exists("images/s0/k2.mask.png")
    elif fmt == "webdataset":
        with tarfile.open(fileobj=io.BytesIO(storage.get_bytes("shards/s0.tar"))) as tar:
            names = tar.getnames()
            assert tar.extractfile("k1.mask.png").read() == mask and "k2.mask.png" not in names
    else:
        table = pq.read_table(io.BytesIO(storage.get_bytes("data/s0.parquet")))
        kept = table.column("mask_image").to_pylist()
        assert kept[0] == {"bytes": mask, "path": "k1.mask.png"} and kept[1] is None
        assert b"mask_image" in table.schema.metadata[b"huggingface"]


def test_the_review_finds_each_format_s_mask():
    from zimage_batch.output.formats import mask_location
    from zimage_batch.output.review import repainted

    assert mask_location("images/s0/k1.webp") == "images/s0/k1.mask.png"
    assert mask_location("shards/s0.tar#k1.jpg") == "shards/s0.tar#k1.mask.png"
    assert mask_location("data/s0.parquet#k1") == "data/s0.parquet#k1"  # its mask_image cell
    half = np.zeros((4, 4), np.uint8)
    half[:2] = 200
    assert repainted(masks.mask_png(Image.fromarray(half, "L"))) == 0.5 and repainted(b"not a png") is None
