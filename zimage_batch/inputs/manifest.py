"""Manifests: Parquet files, local or s3://, read in a streaming way (checked by validation.py).

The driver never holds rows as Python objects: validation runs on Arrow record batches, and
workers read only the row range of the shard they run.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Iterator
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from zimage_batch.inputs.column_types import decoded, plain_schema
from zimage_batch.inputs.columns import KNOWN_COLUMNS
from zimage_batch.metadata_schema import metadata_columns
from zimage_batch.storage import is_s3, open_storage, split_s3_uri
from zimage_batch.text import first_line

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")


class ManifestError(ValueError):
    """The manifest cannot be used; the message is one line naming file, column and rows."""


@dataclass(frozen=True)
class ManifestFile:
    """One Parquet file of a manifest."""

    path: str  # path within the filesystem (bucket/key for S3)
    name: str  # path relative to the manifest root, stable across runs
    num_rows: int
    schema: pa.Schema = dataclass_field(compare=False)  # as the pipeline reads it: see plain_type()
    # Hive-style folders on the way to the file (date=2026-11-27/): columns of every row, as strings
    partition: tuple[tuple[str, str | None], ...] = ()
    stored: pa.Schema | None = dataclass_field(default=None, compare=False)  # the types as written

    def with_partition(self, data: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
        """A table or batch read from this file, with its partition columns appended."""
        for key, value in self.partition:
            data = data.append_column(pa.field(key, pa.string()), pa.array([value] * data.num_rows, pa.string()))
        return data


class Manifest:
    """A Parquet file or folder of files, local or on S3."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, root = _filesystem(uri)
        self.files = self._list_files(root)
        self.schema = self._union_schema()
        self.kind = "edit" if "source" in self.schema.names else "prompt"

    @property
    def passthrough(self) -> pa.Schema:
        """The columns copied into the metadata unchanged, each with one type across all files."""
        return pa.schema([f for f in self.schema if f.name not in KNOWN_COLUMNS])

    def uses_num_images(self, job_num_images: int) -> bool:
        """Whether a job on this manifest draws several images per row: a `num_images` column, or
        a job setting other than 1. Its metadata rows then carry `image_index`."""
        return job_num_images != 1 or "num_images" in self.schema.names

    def metadata_schema(self, image_index: bool = False, lora: bool = False, control: bool = False,
                        curated: dict[str, pa.DataType] | None = None, expanded: bool = False,
                        masks: bool = False) -> pa.Schema:
        """The columns of every ``metadata/<shard>.parquet`` of a job on this manifest."""
        columns = metadata_columns(self.kind == "edit", image_index, lora, control, curated, expanded, masks)
        return pa.schema(list(columns.items()) + list(self.passthrough))

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def _list_files(self, root: str) -> list[ManifestFile]:
        info = self.fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise ManifestError(f"{self.uri}: no such file or folder")
        if info.type == pafs.FileType.File:
            paths = [(root, posixpath.basename(root))]
        else:
            selector = pafs.FileSelector(root, recursive=True)
            paths = sorted(
                (i.path, posixpath.relpath(i.path, root))
                for i in self.fs.get_file_info(selector)
                if i.type == pafs.FileType.File
                and i.path.lower().endswith(PARQUET_SUFFIXES)
                and not any(part.startswith(("_", ".")) for part in posixpath.relpath(i.path, root).split("/"))
            )
            if not paths:
                raise ManifestError(f"{self.uri}: folder holds no .parquet files")
        files = []
        for path, name in paths:
            footer = self._footer(path)
            stored = footer.schema.to_arrow_schema()
            partition = _hive_partition(posixpath.dirname(name))
            for key, _ in partition:
                if key in stored.names:
                    raise ManifestError(f"{self._display(path)}: column '{key}' is named twice, in the file or its folders "
                                        f"({key}=...); rename one of them")
                stored = stored.append(pa.field(key, pa.string()))
            files.append(ManifestFile(path, name, footer.num_rows, plain_schema(stored), partition, stored))
        return files

    def _footer(self, path: str) -> pq.FileMetaData:
        try:
            with self.fs.open_input_file(path) as f:
                return pq.ParquetFile(f).metadata
        except (OSError, pa.ArrowInvalid) as exc:
            raise ManifestError(f"{self._display(path)}: not a readable Parquet file ({first_line(exc)})") from None

    def _union_schema(self) -> pa.Schema:
        """Every column of every file, in order of first appearance. A known column keeps its first
        non-null type (each file's values are checked on their own); a pass-through column gets the
        one type all its files' types widen to, so every shard's metadata agrees."""
        fields: dict[str, pa.Field] = {}
        first_seen: dict[str, str] = {}
        for f in self.files:
            for column in f.schema:
                seen = fields.get(column.name)
                if seen is None or pa.types.is_null(seen.type):
                    fields[column.name], first_seen[column.name] = column, f.name
                elif column.name not in KNOWN_COLUMNS and column.type != seen.type:
                    try:
                        fields[column.name] = pa.unify_schemas(
                            [pa.schema([seen]), pa.schema([column])], promote_options="permissive"
                        ).field(0)
                    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                        raise ManifestError(
                            f"{self._display(f.path)}: column '{column.name}' is {column.type} but "
                            f"{first_seen[column.name]} has {seen.type}; a column needs one type in every file"
                        ) from None
        return pa.schema(list(fields.values()))

    def _display(self, path: str) -> str:
        return f"s3://{path}" if is_s3(self.uri) else path

    def display_name(self, f: ManifestFile) -> str:
        return self._display(f.path)

    # ------------------------------------------------------------------ reading
    def iter_batches(self, f: ManifestFile, batch_size: int = 65536,
                     columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The file's rows batch by batch (only `columns`, when given), partition columns included."""
        own = None if columns is None else [c for c in columns if c in f.schema.names and c not in dict(f.partition)]
        with self.fs.open_input_file(f.path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=own):
                batch = decoded(f.with_partition(batch))
                yield batch if columns is None else batch.select([c for c in columns if c in batch.schema.names])

    def read_column(self, f: ManifestFile, name: str) -> pa.Array:
        """One column of one file (nulls where the file lacks it)."""
        if name not in f.schema.names:
            return pa.nulls(f.num_rows, pa.string())
        partition = dict(f.partition)
        if name in partition:
            return pa.array([partition[name]] * f.num_rows, pa.string())
        with self.fs.open_input_file(f.path) as handle:
            parquet = pq.ParquetFile(handle)
            column = decoded(parquet.read(columns=[name])).column(name).combine_chunks()
            return column.cast(pa.string()) if pa.types.is_null(column.type) else column

    def read_rows(self, f: ManifestFile, start: int, end: int) -> pa.Table:
        """Rows [start, end) of one file, reading only the row groups that hold them."""
        with self.fs.open_input_file(f.path) as handle:
            parquet = pq.ParquetFile(handle)
            groups, offset, first_offset = [], 0, None
            for g in range(parquet.metadata.num_row_groups):
                n = parquet.metadata.row_group(g).num_rows
                if offset < end and offset + n > start:
                    groups.append(g)
                    first_offset = offset if first_offset is None else first_offset
                offset += n
            if not groups:
                return f.schema.empty_table()
            table = decoded(f.with_partition(parquet.read_row_groups(groups)))
        return table.slice(start - first_offset, end - start)


HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # how Spark and Hive write a null partition value


def _hive_partition(folder: str) -> tuple[tuple[str, str | None], ...]:
    """The key=value parts of a file's folder path, values URL-decoded as Spark writes them."""
    parts = []
    for part in folder.split("/") if folder else []:
        key, sep, value = part.partition("=")
        if sep and key:
            value = unquote(value)
            parts.append((unquote(key), None if value == HIVE_NULL else value))
    return tuple(parts)


def open_manifest(uri: str) -> Manifest:
    try:
        return Manifest(uri)
    except ManifestError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise ManifestError(f"{uri}: cannot read manifest ({first_line(exc)})") from None


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if is_s3(uri):
        bucket, key = split_s3_uri(uri)
        fs, _ = open_storage(f"s3://{bucket}").arrow_fs()
        return fs, f"{bucket}/{key}".rstrip("/")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
