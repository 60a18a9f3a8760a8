"""`zimage-batch dedup OUTPUT`: near-duplicate images across a whole output, from the CLIP image
embeddings its metadata stores (`embeddings: true`), written to OUTPUT/duplicates.parquet.

The search is exact: embeddings are unit vectors, so cosine is a dot product, computed block by
block (BLOCK x BLOCK similarities at a time, each pair once) with torch, on the GPU when there is one; only pairs at or over the
threshold are kept. Memory is the embeddings (n x d float32: 3 GB for 10^6 ViT-L/14 images) plus
one block (16 MB); time grows as n^2 d / 2. Committed shards are only read.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from zimage_batch.curate.spec import EMBEDDING_COLUMN
from zimage_batch.output import layout
from zimage_batch.storage import Storage, open_storage

BLOCK = 2048  # rows compared with BLOCK others at once: a 16 MB float32 block of similarities
DEFAULT_THRESHOLD = 0.95
DUPLICATES_SCHEMA = pa.schema([("id_a", pa.string()), ("image_index_a", pa.int64()), ("image_a", pa.string()),
                               ("id_b", pa.string()), ("image_index_b", pa.int64()), ("image_b", pa.string()),
                               ("cosine", pa.float32())])


class DedupError(ValueError):
    """The output cannot be searched (no embeddings); the message is one line."""


@dataclass(frozen=True)
class DedupResult:
    images: int  # images with an embedding that were searched
    pairs: int  # pairs at or over the threshold
    seconds: float
    key: str  # where the pairs were written


def near_pairs(embeddings: np.ndarray, threshold: float, block: int = BLOCK,
               device: str | None = None) -> Iterator[tuple[int, int, float]]:
    """(i, j, cosine) with i < j for every pair of rows of `embeddings` (unit vectors) whose
    cosine is at least `threshold`, by exact blocked search (on the GPU when there is one)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    e = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(device)
    for start in range(0, len(e), block):
        for other in range(start, len(e), block):  # this block against itself and every later block
            sims = e[start : start + block] @ e[other : other + block].T
            found = (sims >= threshold).nonzero().cpu().tolist()
            values = sims[sims >= threshold].cpu().tolist()  # row-major, as nonzero() lists them
            for (r, c), value in zip(found, values):
                if start + r < other + c:  # strictly upper triangle: each pair once, no self-pairs
                    yield start + r, other + c, value


def read_embeddings(storage: Storage) -> tuple[pa.Table, np.ndarray]:
    """The committed images that have an embedding (id, image_index, image) and the embeddings,
    renormalised (float16 storage rounds them a little)."""
    tables = []
    for info in sorted(storage.list(layout.METADATA), key=lambda i: i.key):
        if layout.shard_of_metadata_key(info.key) is None:
            continue
        table = pq.read_table(io.BytesIO(storage.get_bytes(info.key)))
        if EMBEDDING_COLUMN not in table.column_names:
            raise DedupError(f"{info.key} has no {EMBEDDING_COLUMN} column: run the job with embeddings: true")
        index = table.column("image_index") if "image_index" in table.column_names else pa.nulls(len(table), pa.int64())
        table = pa.table({"id": table.column("id"), "image_index": index.cast(pa.int64()),
                          "image": table.column("image"), EMBEDDING_COLUMN: table.column(EMBEDDING_COLUMN)})
        tables.append(table.filter(pc.is_valid(table.column(EMBEDDING_COLUMN))))
    if not tables:
        raise DedupError("the output has no committed metadata yet")
    table = pa.concat_tables(tables)
    table = table.filter(pc.is_valid(table.column("image")))  # stored images only (not filtered rows)
    if len(table) == 0:
        return table, np.zeros((0, 0), np.float32)
    vectors = np.stack([np.asarray(v, dtype=np.float32) for v in table.column(EMBEDDING_COLUMN).to_pylist()])
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return table.drop_columns([EMBEDDING_COLUMN]), vectors


def dedup(output: str, threshold: float = DEFAULT_THRESHOLD) -> DedupResult:
    """Find near-duplicate pairs among OUTPUT's stored images and write OUTPUT/duplicates.parquet."""
    if not -1 <= threshold <= 1:
        raise DedupError(f"--threshold is a cosine similarity in [-1, 1], got {threshold}")
    started = time.perf_counter()
    storage = open_storage(output)
    images, vectors = read_embeddings(storage)
    pairs = list(near_pairs(vectors, threshold)) if len(images) else []
    a = [p[0] for p in pairs]
    b = [p[1] for p in pairs]
    columns = {}
    for side, take in (("a", a), ("b", b)):
        chosen = images.take(pa.array(take, pa.int64()))
        columns |= {f"id_{side}": chosen.column("id"), f"image_index_{side}": chosen.column("image_index"),
                    f"image_{side}": chosen.column("image")}
    columns["cosine"] = pa.array([p[2] for p in pairs], pa.float32())
    table = pa.table({f.name: columns[f.name] for f in DUPLICATES_SCHEMA}, schema=DUPLICATES_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.put_bytes(layout.DUPLICATES, buffer.getvalue())
    return DedupResult(len(images), len(pairs), time.perf_counter() - started, layout.DUPLICATES)
