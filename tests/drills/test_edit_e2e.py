"""Edit manifests end to end: a catalogue of source images on a real S3
server, edited through the CLI; good rows ok with their lineage, bad sources `error` rows with
a specific reason, every row exactly once."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from cli_in_process import cli_in_process
from output_check import check_exactly_once, pixels, read_images
from PIL import Image
from source_images import (
    cmyk_jpeg,
    encode,
    exif_rotated_jpeg,
    gray_png,
    mask_png,
    palette_png,
    pattern,
    png16,
    rgba_png,
    small_jpeg,
)

from zimage_batch.inputs import images
from zimage_batch.output.keys import safe_key
from zimage_batch.storage import open_storage

ROOT = Path(__file__).resolve().parents[2]


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
