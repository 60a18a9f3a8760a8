"""`metadata/<shard>.parquet`: one row per manifest row of a shard."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from zimage_batch.metadata_schema import metadata_columns


def metadata_table(records: Sequence[dict[str, Any]], rows: pa.Table, passthrough: pa.Schema, edit: bool,
                   lora: bool = False, control: bool = False, image_index: bool = False,
                   curated: dict[str, pa.DataType] | None = None, expanded: bool = False,
                   masks: bool = False) -> pa.Table:
    """The metadata of a shard: each record (settings and outcome of one image) in the
    pipeline's columns (`image_index` after `id` when the job uses num_images, the edit lineage,
    `lora` in a job with adapters, the ControlNet conditions in a job with a ControlNet, a curated
    job's scores, tries and embedding), then
    the manifest's pass-through columns of the record's row (`rows` holds one row per record),
    with the same columns and types in every shard of a job (nulls where a manifest file lacks one);
    the mask columns in an edit job that keeps masks."""
    schema = metadata_columns(edit, image_index, lora, control, curated, expanded, masks)  # expanded: `prompt_original`
    table = pa.table({name: pa.array([r.get(name) for r in records], type=t) for name, t in schema.items()})
    for field in passthrough:
        if field.name in rows.column_names:
            values = rows.column(field.name).cast(field.type)
        else:
            values = pa.nulls(rows.num_rows, field.type)
        table = table.append_column(field, values)
    return table


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()
