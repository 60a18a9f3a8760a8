"""Catalogue editing end to end (issue 28): product cut-outs on a real S3 server, their
background repainted from the alpha channel and one photo outpainted to 4:5, through the CLI;
each kept mask beside its image with its sha256 in the metadata, error rows naming the source,
and a second run that redoes nothing (every row exactly once)."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_in_process import cli_in_process
from output_check import check_exactly_once
from PIL import Image

from zimage_batch.output.review import repainted
from zimage_batch.storage import open_storage


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def cutout(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256, np.zeros_like(x)], -1).astype(np.uint8)
    pixels[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4, 3] = 255
    return Image.fromarray(pixels, "RGBA")


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    """The report page of the run below, for the rendering check."""
    return {}


def test_background_replaced_and_outpainted_on_s3_exactly_once(s3_bucket, ray_local, tmp_path, pages):
    store = open_storage(f"s3://{s3_bucket}/shop")
    store.put_bytes("cutouts/a.png", png(cutout(64, 64)))
    store.put_bytes("cutouts/b.png", png(cutout(80, 64)))
    store.put_bytes("photos/c.png", png(cutout(64, 64).convert("RGB")))
    rows = {"id": ["sku-a", "sku-b", "sku-c", "sku-no-alpha", "sku-words"],
            "source": ["cutouts/a.png", "cutouts/b.png", "photos/c.png", "photos/c.png", "photos/c.png"],
            "prompt": ["on a marble table"] * 2 + ["a wider shot", "on wood", "on grass"],
            "mask": ["alpha", "alpha", None, "alpha", None], "aspect": [None, None, "4:5", None, None],
            "mask_prompt": [None] * 4 + ["the background"]}
    segmenter = cli_in_process("make-tiny-model", str(tmp_path / "clipseg"), "--segmenter")
    assert segmenter.returncode == 0, segmenter.stderr[-2000:]
    buffer = io.BytesIO()
    pq.write_table(pa.table(rows), buffer)
    store.put_bytes("manifest.parquet", buffer.getvalue())
    output = f"s3://{s3_bucket}/edited"
    args = ("run", "--manifest", f"s3://{s3_bucket}/shop/manifest.parquet", "--output", output, "--model", "tiny:turbo",
            "--format", "webdataset", "--set", "mask_grow=2", "--set", f"segmenter={tmp_path / 'clipseg'}",
            "--set", "num_inference_steps=2")
    result = cli_in_process(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    by_id = {r["id"]: r for r in check_exactly_once(output, rows["id"])}
    assert [by_id[i]["status"] for i in rows["id"]] == ["ok", "ok", "ok", "error", "ok"]
    assert (by_id["sku-words"]["mask"], by_id["sku-words"]["mask_prompt"]) == ("words", "the background")
    assert "no alpha channel" in by_id["sku-no-alpha"]["error"] and "photos/c.png" in by_id["sku-no-alpha"]["error"]
    assert (by_id["sku-a"]["mask"], by_id["sku-a"]["mask_grow"], by_id["sku-a"]["mode"]) == ("alpha", 2, "inpaint")
    assert (by_id["sku-c"]["mask"], by_id["sku-c"]["outpaint"], by_id["sku-c"]["anchor"]) == ("outpaint", "4:5", "center")
    assert (by_id["sku-c"]["width"], by_id["sku-c"]["height"]) == (64, 80)  # the 4:5 canvas of a 64x64 photo
    members: dict[str, bytes] = {}
    for info in open_storage(output).list("shards/"):
        with tarfile.open(fileobj=io.BytesIO(open_storage(output).get_bytes(info.key))) as tar:
            members |= {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for row in by_id.values():
        key = row["image"].split("#", 1)[1].rsplit(".", 1)[0] if row["image"] else None
        if row["status"] == "ok":
            mask = members[f"{key}.mask.png"]
            assert hashlib.sha256(mask).hexdigest() == row["mask_sha256"]
            assert Image.open(io.BytesIO(mask)).size == (row["width"], row["height"])
    # the report: source | mask | output for each edited image, most repainted first
    page = open_storage(output).get_bytes("report.html").decode("utf-8")
    shown = re.findall(r'class=triptych data-repainted="(\d+)%"', page)
    shares = sorted((repainted(members[f"{r['image'].split('#', 1)[1].rsplit('.', 1)[0]}.mask.png"])
                     for r in by_id.values() if r["status"] == "ok"), reverse=True)
    assert [int(v) for v in shown] == [round(100 * share) for share in shares] and len(shown) == 4
    assert "Before and after" in page and "not readable" not in page and page.count("<img") >= 4 * 3
    pages["report"] = page
    card = open_storage(output).get_bytes("README.md").decode("utf-8")  # load_dataset reads each mask as an Image
    assert re.search(r"name: mask\.png\n\s*dtype: image", card), card
    again = cli_in_process(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "no shards committed by this run" in again.stdout  # nothing redone
    assert check_exactly_once(output, rows["id"])


def test_the_review_renders_in_chromium(pages, tmp_path):
    from test_status_report import render_in_chromium

    assert "report" in pages, "the run above did not get to its report"
    _, loaded, images, _ = render_in_chromium(pages["report"], tmp_path)
    assert loaded == images and images >= 12
