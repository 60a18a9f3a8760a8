"""The report's before/after review of an edit job that keeps masks (issue 28): for a sample of
edited images, the source | the mask as used | the output, side by side, ordered by how much
was repainted (the share of the output's pixels its mask repaints, most first), so a reviewer
starts with the images that changed most.

Sources are read from their URIs (local or s3://) when the report renders; one that cannot be
read shows as missing. The mask is where the image's output format keeps it
(`output.formats.mask_location`: a `<key>.mask.png` object or member, a `mask_image` cell).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from zimage_batch.output import layout
from zimage_batch.output.formats import MASK_COLUMN, mask_location
from zimage_batch.storage import open_storage

MAX_REVIEW = 60  # triptychs shown
MAX_REVIEW_SHARDS = 20
COLUMNS = ["id", "image_index", "status", "image", "source", "mask", "mask_sha256", "width", "height"]

ReadImages = Callable[..., dict[str, bytes]]


def review_section(state: Any, read_images: ReadImages, thumbnail: Callable[[bytes], str | None],
                   escape: Callable[[Any], str]) -> str:
    """The review section's HTML ('' for a job that keeps no masks)."""
    rows = review_rows(state)
    if rows is None:
        return ""
    outputs = read_images(state.storage, rows, key="image")
    masks = read_images(state.storage, [{**r, "image": mask_location(r["image"])} for r in rows], key="image",
                        column=MASK_COLUMN)
    with ThreadPoolExecutor(max_workers=8) as pool:
        sources = dict(zip((r["image"] for r in rows), pool.map(_source_bytes, [r["source"] for r in rows])))
    cards = []
    for row in rows:
        mask = masks.get(mask_location(row["image"]))
        share = repainted(mask) if mask else None
        cells = [(sources.get(row["image"]), "source"), (mask, "mask"), (outputs.get(row["image"]), "output")]
        cards.append((share if share is not None else -1.0, _card(row, cells, share, thumbnail, escape)))
    cards.sort(key=lambda card: -card[0])
    body = "".join(html for _, html in cards) or "<p>No edited images yet.</p>"
    return ("<section><h2>Before and after</h2><p class=muted>Source | mask (white: repainted) | output, for "
            f"{len(rows)} edited images, most repainted first.</p><div class=review>{body}</div></section>")


def repainted(mask_png: bytes) -> float | None:
    """The share of pixels a mask repaints (values from 128, as the model binarizes it)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(mask_png)) as image:
            return float((np.asarray(image.convert("L")) >= 128).mean())
    except Exception:  # noqa: BLE001 - an unreadable mask shows as missing
        return None


def review_rows(state: Any) -> list[dict[str, Any]] | None:
    """Up to MAX_REVIEW ok rows of a job that keeps masks, evenly spread over its shards; None
    when its metadata has no masks."""
    import pyarrow.parquet as pq

    shards = [m for m in state.markers if m.ok]
    if not shards:
        return None
    step = max(1, math.ceil(len(shards) / MAX_REVIEW_SHARDS))
    chosen = shards[::step]
    rows: list[dict[str, Any]] = []
    for marker in chosen:
        pf = pq.ParquetFile(io.BytesIO(state.storage.get_bytes(layout.metadata_key(marker.shard))))
        if "mask_sha256" not in pf.schema_arrow.names:
            return None
        found = pf.read(columns=[c for c in COLUMNS if c in pf.schema_arrow.names]).to_pylist()
        rows += [r for r in found if r["status"] == "ok" and r.get("mask_sha256")][: math.ceil(MAX_REVIEW / len(chosen))]
    return rows[:MAX_REVIEW]


def _source_bytes(uri: str | None) -> bytes | None:
    if not uri:
        return None
    parent, _, name = uri.rpartition("/")
    try:
        return open_storage(parent or ".").get_bytes(name)
    except Exception:  # noqa: BLE001 - a source moved or unreadable shows as missing
        return None


def _card(row: dict[str, Any], cells: list[tuple[bytes | None, str]], share: float | None,
          thumbnail: Callable[[bytes], str | None], escape: Callable[[Any], str]) -> str:
    images = []
    for data, what in cells:
        uri = thumbnail(data) if data else None
        images.append(f'<img src="{uri}" alt="{what}" title="{what}">' if uri
                      else f"<div class=missing>{what} not readable</div>")
    amount = "?" if share is None else f"{share:.0%}"
    return (f"<figure class=triptych data-repainted=\"{amount}\"><div class=three>{''.join(images)}</div>"
            f"<figcaption><p class=muted>id <code>{escape(row['id'])}</code> &middot; {amount} repainted &middot; "
            f"mask {escape(row.get('mask'))}</p></figcaption></figure>")
