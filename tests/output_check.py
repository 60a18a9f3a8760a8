"""Read a finished OUTPUT (SPEC §5) back as a user would, and check its guarantees."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

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


def read_images(output: str, rows: list[dict]) -> dict[str, bytes]:
    """Image bytes by id, following each row's `image` column for every format."""
    storage = open_storage(output)
    tars: dict[str, dict[str, bytes]] = {}
    parquets: dict[str, dict[str, bytes]] = {}
    images = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        location = row["image"]
        if "#" not in location:
            images[row["id"]] = storage.get_bytes(location)
            continue
        obj, member = location.split("#", 1)
        if obj.endswith(".tar"):
            if obj not in tars:
                with tarfile.open(fileobj=io.BytesIO(storage.get_bytes(obj))) as tar:
                    tars[obj] = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            images[row["id"]] = tars[obj][member]
        else:
            if obj not in parquets:
                table = pq.read_table(io.BytesIO(storage.get_bytes(obj)))
                images_ = [image["bytes"] for image in table.column("image").to_pylist()]
                parquets[obj] = dict(zip(table.column("__key__").to_pylist(), images_))
            images[row["id"]] = parquets[obj][member]
    return images


def check_exactly_once(output: str, ids: list[str]) -> list[dict]:
    """Every id once across committed metadata; sha256 matches the stored bytes; no orphans."""
    rows = read_metadata(output)
    counts = Counter(r["id"] for r in rows)
    assert sorted(counts) == sorted(ids), "metadata ids differ from the manifest"
    assert max(counts.values()) == 1, f"duplicated ids: {[i for i, c in counts.items() if c > 1][:5]}"
    images = read_images(output, rows)
    for row in rows:
        if row["status"] == "ok":
            assert hashlib.sha256(images[row["id"]]).hexdigest() == row["sha256"], row["id"]
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
        if top == "images":
            assert info.key in referenced, f"orphan image {info.key}"
        elif top in ("shards", "data", "metadata"):
            shard = info.key.split("/", 1)[1].rsplit(".", 1)[0]
            assert shard in shards, f"orphan object {info.key} of an uncommitted shard"


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def load_json(output: str, key: str) -> dict:
    return json.loads(open_storage(output).get_bytes(key))
