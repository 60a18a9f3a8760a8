"""Row identity: a row's derived seed, which rows run on a variant, and the digest of rows that
a commit marker records (so a later run knows committed rows are unchanged)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from zimage_batch.inputs.column_types import plain_type

if TYPE_CHECKING:
    from zimage_batch.inputs.manifest import ManifestFile


def derive_seed(job_seed: int, row_id: str) -> int:
    """The seed of a row that has none: stable across runs, distinct across ids."""
    digest = hashlib.sha256(f"{job_seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def variant_mask(rows: pa.Table | pa.RecordBatch, variant: str, job_variant: str | None) -> pa.Array | pa.ChunkedArray:
    """True for the rows that run on `variant` (rows without one run on the job's)."""
    if "variant" not in rows.schema.names:
        return pa.array(np.full(rows.num_rows, variant == job_variant))
    names = pc.fill_null(pc.cast(rows.column("variant"), pa.string()), job_variant or "")
    return pc.equal(names, variant)


def rows_of_variant(table: pa.Table, variant: str, job_variant: str) -> pa.Table:
    """The rows of `table` that run on `variant` (rows without one run on the job's)."""
    return table.filter(variant_mask(table, variant, job_variant))


def rows_digest(table: pa.Table) -> str:
    """Content hash of rows, independent of how they are chunked or sliced. It covers the Arrow
    types: hash rows as the manifest reads them (Manifest.read_rows / iter_batches), so that a
    string column hashes the same whichever string type the file stores."""
    table = table.replace_schema_metadata(None)
    table = table.take(pa.array(np.arange(table.num_rows))).combine_chunks()
    h = hashlib.sha256(table.schema.to_string().encode())
    for batch in table.to_batches():
        h.update(batch.serialize())
    return h.hexdigest()


def digest_matches(f: ManifestFile, table: pa.Table, digest: str) -> bool:
    """Whether rows read from `f` are those a commit marker's `digest` was taken of. Earlier
    versions hashed `large_string` and `large_binary` columns (pandas' and Polars' strings)
    as stored; such a digest is matched by hashing the rows in those types again."""
    if rows_digest(table) == digest:
        return True
    legacy = _legacy_schema(f, table.schema)
    return legacy is not None and rows_digest(table.cast(legacy)) == digest


def _legacy_schema(f: ManifestFile, schema: pa.Schema) -> pa.Schema | None:
    """`schema` with the large string and binary columns of `f` as earlier versions read them
    (as stored, categoricals decoded), or None when the file has none."""
    if f.stored is None:
        return None
    fields, changed = [], False
    for field in schema:
        stored = f.stored.field(field.name).type if field.name in f.stored.names else field.type
        stored = stored.value_type if pa.types.is_dictionary(stored) else stored
        if stored != field.type and plain_type(stored) == field.type and not _has_view(stored):
            field, changed = field.with_type(stored), True
        fields.append(field)
    return pa.schema(fields) if changed else None


def _has_view(t: pa.DataType) -> bool:
    """Whether `t` holds a view type, which earlier versions could not commit."""
    views = (pa.types.is_string_view, pa.types.is_binary_view, pa.types.is_list_view, pa.types.is_large_list_view)
    if any(is_view(t) for is_view in views):
        return True
    return any(_has_view(t.field(i).type) for i in range(t.num_fields))
