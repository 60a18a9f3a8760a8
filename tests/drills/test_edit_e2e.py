"""Edit manifests end to end: a catalogue of source images on a real S3
server, edited through the CLI; good rows ok with their lineage, bad sources `error` rows with
a specific reason, every row exactly once."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_in_process import cli_in_process
from output_check import check_exactly_once, pixels, read_images
from PIL import Image

from zimage_batch.inputs import images
from zimage_batch.model.variants import get_variant
from zimage_batch.output.keys import safe_key
from zimage_batch.storage import open_storage

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- sources of every kind
def pattern(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x * 5 + y * 3) % 256], -1).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    """Stored 96 wide x 64 high, EXIF orientation 6: shown upright as 64 x 96."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(pattern(96, 64)), "JPEG", exif=exif, quality=95)


def palette_png() -> bytes:
    return encode(Image.fromarray(pattern(80, 64)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG")


def gray_png() -> bytes:
    return encode(Image.fromarray(pattern(64, 64)[..., 0], "L"), "PNG")


def rgba_png() -> bytes:
    rgba = np.dstack([pattern(64, 64), np.full((64, 64), 255, np.uint8)])
    rgba[:, :32, 3] = 0  # left half transparent: white once composited
    return encode(Image.fromarray(rgba, "RGBA"), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(Image.fromarray(pattern(64, 64)).convert("CMYK"), "JPEG", quality=95)


def png16() -> bytes:
    """16-bit grayscale, 64 wide x 80 high, values up to 65535."""
    y, x = np.mgrid[0:80, 0:64]
    return encode(Image.fromarray(((x + y) * 65535 // 142).astype(np.uint16)), "PNG")


def mask_png() -> bytes:
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    return encode(Image.fromarray(mask, "L"), "PNG")


def small_jpeg() -> bytes:
    return encode(Image.fromarray(pattern(40, 40)), "JPEG")


# ---------------------------------------------------------------------- decoding
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


# ---------------------------------------------------------------------- end to end
def _reference(mode: str, model: str, request, source: Image.Image, mask: Image.Image | None) -> np.ndarray:
    """The row through diffusers' own reference pipeline."""
    import diffusers

    from zimage_batch.model.sources import resolve_model

    name = {"img2img": "ZImageImg2ImgPipeline", "inpaint": "ZImageInpaintPipeline", "edit": "ZImageOmniPipeline"}[mode]
    pipe = getattr(diffusers, name).from_pretrained(resolve_model(model).path)
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt=request["prompt"], width=request["width"], height=request["height"],
                num_inference_steps=request["num_inference_steps"], guidance_scale=request["guidance_scale"],
                generator=torch.Generator("cpu").manual_seed(request["seed"]), output_type="np")
    if mode == "inpaint":
        args |= {"mask_image": mask, "strength": request["strength"]}
    elif mode == "img2img":
        args |= {"strength": request["strength"]}
    out = pipe(image=source, **args).images[0]
    return (out * 255).round().astype(np.uint8)


def test_catalogue_edit_on_s3(tmp_path, s3_bucket, ray_local):
    """img2img and inpaint on tiny:turbo: sources of every kind, local, s3:// and relative."""
    store = open_storage(f"s3://{s3_bucket}/catalogue")
    uploads = {
        "images/exif.jpg": exif_rotated_jpeg(),
        "images/palette.png": palette_png(),
        "images/gray.png": gray_png(),
        "images/rgba.png": rgba_png(),
        "images/cmyk.jpg": cmyk_jpeg(),
        "images/deep.png": png16(),
        "images/small.jpg": small_jpeg(),
        "images/base.png": encode(Image.fromarray(pattern(64, 64)), "PNG"),
        "masks/box.png": mask_png(),
        "images/corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "images/truncated.jpg": exif_rotated_jpeg()[:600],
        "images/notes.txt": b"not an image at all\n",
        "images/huge.png": encode(Image.new("RGB", (300, 200), "red"), "PNG"),
    }
    for key, data in uploads.items():
        store.put_bytes(key, data)
    local = tmp_path / "local.png"
    local.write_bytes(gray_png())
    s3 = f"s3://{s3_bucket}/catalogue/"
    rows = [  # id, source, mode, mask, strength, seed, width, height
        ("SKU-001", s3 + "images/exif.jpg", None, None, None, 11, None, None),
        ("SKU-002", "images/palette.png", None, None, 0.8, 12, None, None),  # relative to the manifest
        ("SKU-003", s3 + "images/gray.png", "img2img", None, None, 13, 96, 64),  # explicit size
        ("SKU-004", s3 + "images/rgba.png", None, None, None, 14, None, None),
        ("SKU-005", s3 + "images/cmyk.jpg", None, None, None, 15, None, None),
        ("SKU-006", s3 + "images/deep.png", None, None, None, 16, None, None),
        ("SKU-007", s3 + "images/small.jpg", None, None, None, 17, None, None),
        ("SKU-008", s3 + "images/base.png", None, s3 + "masks/box.png", 0.9, 18, None, None),  # inpaint
        ("SKU-009", str(local), None, None, None, 19, None, None),  # a local path
        ("BAD-corrupt", s3 + "images/corrupt.png", None, None, None, 20, None, None),
        ("BAD-truncated", s3 + "images/truncated.jpg", None, None, None, 21, None, None),
        ("BAD-text", s3 + "images/notes.txt", None, None, None, 22, None, None),
        ("BAD-missing", s3 + "images/gone.jpg", None, None, None, 23, None, None),
        ("BAD-huge", s3 + "images/huge.png", None, None, None, 24, None, None),
        ("BAD-mask", s3 + "images/base.png", "inpaint", s3 + "masks/gone.png", None, 25, None, None),
    ]
    columns = ["id", "source", "mode", "mask", "strength", "seed", "width", "height"]
    table = pa.table({name: [r[i] for r in rows] for i, name in enumerate(columns)}, schema=pa.schema([
        ("id", pa.string()), ("source", pa.string()), ("mode", pa.string()), ("mask", pa.string()),
        ("strength", pa.float64()), ("seed", pa.int64()), ("width", pa.int64()), ("height", pa.int64())]))
    table = table.append_column("prompt", pa.array([f"studio photo of product {r[0]}" for r in rows]))
    table = table.append_column("category", pa.array([f"cat-{i % 3}" for i in range(len(rows))]))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    store.put_bytes("manifest.parquet", buffer.getvalue())

    output = f"s3://{s3_bucket}/edited"
    result = cli_in_process("run", "--manifest", s3 + "manifest.parquet", "--output", output, "--model", "tiny:turbo",
                            "--shard-size", "8", "--batch-size", "4", "--set", "max_source_pixels=50000")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "9 ok" in result.stdout and "6 error" in result.stdout, result.stdout[-2000:]

    ids = [r[0] for r in rows]
    by_id = {r["id"]: r for r in check_exactly_once(output, ids)}
    for row_id, source, *_ in rows[:9]:
        r = by_id[row_id]
        assert r["status"] == "ok" and r["error"] is None, (row_id, r["error"])
        assert r["image"].startswith("images/") and r["image"].endswith(f"/{safe_key(row_id)}.png")
        uri = source if "://" in source or source.startswith("/") else s3 + source
        assert r["source"] == uri
        data = local.read_bytes() if uri == str(local) else uploads[uri[len(s3):]]
        assert r["source_sha256"] == hashlib.sha256(data).hexdigest()
    sizes = {i: (by_id[i]["source_width"], by_id[i]["source_height"], by_id[i]["width"], by_id[i]["height"]) for i in ids[:9]}
    assert sizes["SKU-001"] == (64, 96, 64, 96)  # EXIF orientation applied; output follows the source
    assert sizes["SKU-002"] == (80, 64, 80, 64)
    assert sizes["SKU-003"] == (64, 64, 96, 64)  # the row's own size wins
    assert sizes["SKU-006"] == (64, 80, 64, 80)
    assert sizes["SKU-007"] == (40, 40, 64, 64)  # scaled up to the model's smallest side
    assert {by_id[i]["mode"] for i in ids[:9] if i != "SKU-008"} == {"img2img"}
    assert by_id["SKU-008"]["mode"] == "inpaint" and by_id["SKU-008"]["mask"] == s3 + "masks/box.png"
    assert by_id["SKU-001"]["mask"] is None and by_id["SKU-001"]["strength"] == 0.6
    assert by_id["SKU-002"]["strength"] == 0.8 and by_id["SKU-002"]["category"] == "cat-1"

    reasons = {
        "BAD-corrupt": "source is corrupt",
        "BAD-truncated": "source is corrupt or truncated",
        "BAD-text": "source is not an image",
        "BAD-missing": f"source not found: {s3}images/gone.jpg",
        "BAD-huge": "source too large",
        "BAD-mask": f"mask not found: {s3}masks/gone.png",
    }
    for row_id, reason in reasons.items():
        r = by_id[row_id]
        assert r["status"] == "error" and r["image"] is None and reason in r["error"], (row_id, r["error"])
    assert by_id["BAD-corrupt"]["source_sha256"] == hashlib.sha256(uploads["images/corrupt.png"]).hexdigest()
    assert by_id["BAD-missing"]["source_sha256"] is None

    # the pixels of an img2img and an inpaint row equal diffusers' reference pipelines
    stored = read_images(output, [by_id["SKU-001"], by_id["SKU-008"]])
    upright = images.decode(uploads["images/exif.jpg"], "exif.jpg")
    want = _reference("img2img", "tiny:turbo", by_id["SKU-001"], upright, None)
    assert np.abs(pixels(stored["SKU-001"]).astype(int) - want.astype(int)).max() <= 1
    source = images.decode(uploads["images/base.png"], "base.png")
    mask = images.decode(uploads["masks/box.png"], "box.png").convert("L")
    want = _reference("inpaint", "tiny:turbo", by_id["SKU-008"], source, mask)
    assert np.abs(pixels(stored["SKU-008"]).astype(int) - want.astype(int)).max() <= 1


def test_catalogue_edit_job_file_with_omni(tmp_path, s3_bucket, ray_local):
    """jobs/catalogue-edit.yaml (omni, instruction editing), pointed at a tiny omni model."""
    store = open_storage(f"s3://{s3_bucket}/shop")
    ids = ["prod/0001", "prod/0002", "prod/0003"]
    for i in range(3):
        store.put_bytes(f"edits/photos/{i}.jpg", encode(Image.fromarray(pattern(80 + 16 * i, 64)), "JPEG"))
    table = pa.table({
        "id": ids,
        "source": [f"photos/{i}.jpg" for i in range(3)],
        "prompt": ["make the background white", "把产品换成红色", "add soft shadows"],
        "brand": ["acme", "acme", "globex"],
    })
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    store.put_bytes("edits/part-0.parquet", buffer.getvalue())

    output = f"s3://{s3_bucket}/edited"
    result = cli_in_process("run", str(ROOT / "jobs" / "catalogue-edit.yaml"), "--manifest", f"s3://{s3_bucket}/shop/edits/",
                            "--output", output, "--model", "tiny:omni", "--workers", "1", "--set", "num_inference_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = check_exactly_once(output, ids)
    for i, r in enumerate(sorted(rows, key=lambda r: r["id"])):
        assert r["status"] == "ok", r["error"]
        # keyed by the product id
        assert r["image"].startswith("images/") and r["image"].endswith(f"/{safe_key(ids[i])}.webp")
        assert (r["mode"], r["strength"], r["mask"], r["variant"]) == ("edit", None, None, "omni")
        assert (r["width"], r["height"]) == (80 + 16 * i, 64) and r["brand"] == table["brand"][i].as_py()
        assert r["source"] == f"s3://{s3_bucket}/shop/edits/photos/{i}.jpg"  # relative to the manifest file


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
