"""``--format parquet``: ``data/<shard>.parquet``: ``__key__``, ``id``, ``image`` (a struct of
``bytes`` and ``path``, declared as a Hugging Face ``Image`` in the schema metadata), ``prompt``
and the rest of the sample's metadata (and ``mask_image`` in a job that keeps masks). Read back
cell by cell, row group by row group; ready for ``datasets.load_dataset("parquet")``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from zimage_batch.metadata_schema import METADATA_COLUMNS
from zimage_batch.output import layout
from zimage_batch.output.encoding import PNG, Encoding
from zimage_batch.output.features import IMAGE_STRUCT, sample_fields, with_features, yaml_features
from zimage_batch.output.formats.base import MASK_COLUMN, CardInput, OutputFormat, read_containers
from zimage_batch.output.shard_writer import ShardWriter, TempDirMixin
from zimage_batch.storage import Storage


class ParquetWriter(TempDirMixin, ShardWriter):
    """``data/<shard>.parquet``: one row per sample, ready for ``datasets.load_dataset("parquet")``.

    Columns: ``__key__`` (the sample key, as WebDataset loaders name it), ``id``, ``image`` (a
    struct of ``bytes`` and ``path`` = ``<key>.<ext>``: how `datasets` stores an ``Image``,
    declared so in the schema metadata), ``prompt``, then the other ``fields`` of the sample's
    metadata (the settings, then pass-through columns; by default the settings only). Rows are
    flushed to a local temp file in row groups (bounded memory), uploaded by ``close()``.
    """

    output_format = "parquet"
    ROW_GROUP_BYTES = 64 << 20
    ROW_GROUP_ROWS = 1024
    KEY_COLUMN = "__key__"

    def __init__(self, storage: Storage, shard: str, encoding: Encoding = PNG, *,
                 fields: pa.Schema | None = None) -> None:
        super().__init__(storage, shard, encoding)
        self.object = layout.parquet_key(self.shard)
        self._path = os.path.join(self._make_tmpdir("zimage-pq-"), f"{self.shard}.parquet")
        self.schema = parquet_schema(fields)
        self._pq_writer = None
        self._rows: list[dict[str, Any]] = []
        self._buffered = 0

    def _add(self, key: str, data: bytes, meta: dict, mask: bytes | None = None) -> str:
        row = {name: meta.get(name) for name in self.schema.names[3:]}
        row_id = meta.get("id")
        row |= {self.KEY_COLUMN: key, "id": None if row_id is None else str(row_id),
                "image": {"bytes": data, "path": f"{key}.{self.ext}"}}
        if MASK_COLUMN in row:
            row[MASK_COLUMN] = None if mask is None else {"bytes": mask, "path": f"{key}{layout.MASK_SUFFIX}"}
        self._rows.append(row)
        self._buffered += len(data)
        if self._buffered >= self.ROW_GROUP_BYTES or len(self._rows) >= self.ROW_GROUP_ROWS:
            self._flush()
        return f"{self.object}#{key}"

    def _writer(self):
        if self._pq_writer is None:
            # image bytes are already compressed (PNG, JPEG, WebP): zstd would only cost time
            compression = {name: "zstd" for name in self.schema.names} | {"image.path": "zstd", "image.bytes": "none"}
            self._pq_writer = pq.ParquetWriter(self._path, self.schema, compression=compression)
        return self._pq_writer

    def _flush(self):
        if not self._rows:
            return
        table = pa.Table.from_pylist(self._rows, schema=self.schema)
        self._writer().write_table(table, row_group_size=len(self._rows))
        self._rows = []
        self._buffered = 0

    def _close(self):
        self._flush()
        self._writer().close()  # an empty shard still gets a file with the schema
        self._pq_writer = None
        self.storage.put_file(self.object, self._path)
        self._remove_tmpdir()

    def _abort(self):
        if self._pq_writer is not None:
            try:
                self._pq_writer.close()
            except Exception:
                pass
            self._pq_writer = None
        self._rows = []
        self._remove_tmpdir()


def parquet_schema(fields: pa.Schema | None = None) -> pa.Schema:
    """The schema of a ``data/<shard>.parquet``: key, id, image and prompt first, then `fields`
    (a sample's metadata columns; default: the settings every sample has), with the
    ``huggingface`` features metadata that makes ``image`` an ``Image``."""
    if fields is None:
        fields = sample_fields(pa.schema(list(METADATA_COLUMNS.items())))
    first = [pa.field(ParquetWriter.KEY_COLUMN, pa.string()), pa.field("id", pa.string()),
             pa.field("image", IMAGE_STRUCT), pa.field("prompt", pa.string())]
    taken = {f.name for f in first}
    rest = [f for f in fields if f.name not in taken]
    if "mask_sha256" in fields.names:  # a job that keeps masks: each inpaint row's mask as used
        rest.append(pa.field(MASK_COLUMN, IMAGE_STRUCT))
    images = {"image", MASK_COLUMN} if "mask_sha256" in fields.names else {"image"}
    return with_features(pa.schema(first + rest), images=images)


def read(storage: Storage, locations: Sequence[str], column: str = "image") -> dict[str, bytes]:
    """`column` cells (`image`, or `mask_image`) of the rows the locations' keys name."""
    return read_containers(storage, locations, lambda st, obj, wanted: _parquet_members(st, obj, wanted, column))


def _parquet_members(storage: Storage, obj: str, wanted: set[str], name: str = "image") -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with storage.open_read(obj) as f:
        pf = pq.ParquetFile(f)
        if name not in pf.schema_arrow.names:
            return out
        key = "__key__" if "__key__" in pf.schema_arrow.names else "key"  # "key": outputs written before the datasets layout
        image = [f"{name}.bytes"] if pa.types.is_struct(pf.schema_arrow.field(name).type) else [name]
        for group in range(pf.num_row_groups):
            keys = pf.read_row_group(group, columns=[key]).column(key).to_pylist()
            if wanted.intersection(keys):
                column = pf.read_row_group(group, columns=image).column(name)
                values = column.combine_chunks().field("bytes") if pa.types.is_struct(column.type) else column
                out |= {k: v for k, v in zip(keys, values.to_pylist()) if k in wanted and v is not None}
    return out


def mask_location(image: str) -> str:
    """The row's own location: its mask is the `MASK_COLUMN` cell beside its image."""
    return image


def features(card: CardInput) -> list[dict[str, Any]]:
    """The columns of a committed data file, images as `Image`."""
    with card.storage.open_read(layout.parquet_key(card.shard)) as f:
        schema = pq.read_schema(f).remove_metadata()
    return yaml_features(schema, images={"image", MASK_COLUMN} if card.masks else {"image"})


def loading(ext: str) -> list[str]:
    return ['ds = load_dataset("path/to/this/folder", split="train")  # image (PIL), prompt, settings']


FORMAT = OutputFormat(
    name="parquet",
    folder=layout.DATA,
    shard_key=layout.parquet_key,
    writer=ParquetWriter,
    writer_options=("fields",),
    read=read,
    mask_location=mask_location,
    data_files=f"{layout.DATA}*.parquet",
    features=features,
    loading=loading,
    stages_locally=True,
)
