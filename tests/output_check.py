"""Read a finished OUTPUT back as a user would, and check its guarantees."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from zimage_batch.output import formats
from zimage_batch.storage import open_storage


def read_metadata(output: str) -> list[dict]:
    """All rows of all committed shards' metadata."""
    storage = open_storage(output)
    committed = {i.key[len("_commits/") : -len(".json")] for i in storage.list("_commits/")}
    rows = []
    for shard in sorted(committed):
        table = pq.read_table(io.BytesIO(storage.get_bytes(f"metadata/{shard}.parquet")))
        rows.extend(table.to_pylist())
    return rows


def image_of(row: dict) -> str | tuple[str, int]:
    """What names one image: its id, or (id, image_index) in a job that uses num_images."""
    return row["id"] if row.get("image_index") is None else (row["id"], row["image_index"])


def read_images(output: str, rows: list[dict]) -> dict:
    """Image bytes by `image_of(row)` (the id, unless the job uses num_images), following each
    ok row's `image` column through its format's reader (`zimage_batch.output.formats`); every
    one must be readable."""
    ok = [row for row in rows if row["status"] == "ok"]
    found = formats.read_images(open_storage(output), [row["image"] for row in ok])
    missing = [row["image"] for row in ok if row["image"] not in found]
    assert not missing, f"images that cannot be read: {missing[:5]}"
    return {image_of(row): found[row["image"]] for row in ok}


def check_exactly_once(output: str, ids: list[str], num_images: int | dict[str, int] | None = None) -> list[dict]:
    """Every id once across committed metadata (with `num_images`, an int or one per id: every
    (id, image_index) once); sha256 matches the stored bytes; no orphans."""
    rows = read_metadata(output)
    counts = Counter(image_of(r) for r in rows)
    if num_images is None:
        expected = list(ids)
    else:
        per_id = num_images if isinstance(num_images, dict) else dict.fromkeys(ids, num_images)
        expected = [(i, k) for i in ids for k in range(per_id[i])]
    assert sorted(counts, key=str) == sorted(expected, key=str), "metadata images differ from the manifest's"
    assert max(counts.values()) == 1, f"duplicated images: {[i for i, c in counts.items() if c > 1][:5]}"
    images = read_images(output, rows)
    for row in rows:
        if row["status"] == "ok":
            assert hashlib.sha256(images[image_of(row)]).hexdigest() == row["sha256"], image_of(row)
    check_no_orphans(output, rows)
    return rows


def check_no_orphans(output: str, rows: list[dict]) -> None:
    """Every stored object belongs to a committed shard and every image to a metadata row."""
    storage = open_storage(output)
    shards = {i.key[len("_commits/") : -len(".json")] for i in storage.list("_commits/")}
    referenced = {r["image"].split("#", 1)[0] for r in rows if r["status"] == "ok"}
    for info in storage.list():
        top = info.key.split("/", 1)[0]
        assert top != "_staging", f"staged file {info.key} left behind by a finished run"
        if top == "images" and info.key.endswith(".mask.png"):  # an edited image's kept mask, beside it
            image = info.key[: -len(".mask.png")]
            assert any(r.startswith(image + ".") for r in referenced), f"orphan mask {info.key}"
        elif top == "images":
            assert info.key in referenced, f"orphan image {info.key}"
        elif top in ("shards", "data", "metadata"):
            shard = info.key.split("/", 1)[1].rsplit(".", 1)[0]
            assert shard in shards, f"orphan object {info.key} of an uncommitted shard"


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def load_json(output: str, key: str) -> dict:
    return json.loads(open_storage(output).get_bytes(key))
