"""Shard writers: one per output format, made by name (`make_writer`).

Each format's writer lives in its module of `zimage_batch.output.formats` (files, webdataset,
parquet), on the life cycle of `output.shard_writer.ShardWriter`; images are encoded by
`output.encoding`. This module makes the writer a job's format names, and keeps the names
callers import from here.
"""

from __future__ import annotations

from zimage_batch.output.encoding import IMAGE_FORMATS, PNG, Encoding, ImageFormat, encode_image
from zimage_batch.output.formats import FORMAT_NAMES, get_format
from zimage_batch.output.formats.files import FilesWriter
from zimage_batch.output.formats.parquet import MASK_IMAGE_COLUMN, ParquetWriter, parquet_schema
from zimage_batch.output.formats.webdataset import WebDatasetWriter, meta_json
from zimage_batch.output.shard_writer import ShardWriter
from zimage_batch.storage import Storage

__all__ = [
    "IMAGE_FORMATS",
    "MASK_IMAGE_COLUMN",
    "OUTPUT_FORMATS",
    "Encoding",
    "ImageFormat",
    "encode_image",
    "meta_json",
    "parquet_schema",
    "ShardWriter",
    "FilesWriter",
    "WebDatasetWriter",
    "ParquetWriter",
    "make_writer",
]

OUTPUT_FORMATS = FORMAT_NAMES

#: Every keyword some format's writer takes beyond the common ones (a writer ignores the others').
_WRITER_OPTIONS = frozenset(option for name in FORMAT_NAMES for option in get_format(name).writer_options)


def make_writer(fmt: str, storage: Storage, shard: str, encoding: Encoding = PNG, **kwargs) -> ShardWriter:
    """The writer for output format ``fmt`` (``files`` | ``webdataset`` | ``parquet``), saving
    images as ``encoding`` says (PNG unless given).

    ``upload_threads`` / ``max_pending`` (keyword only) tune the files writer; ``fields`` (the
    sample's metadata columns, pass-through ones included) are the Parquet writer's columns. Each
    writer ignores the others' keywords.
    """
    output = get_format(fmt)
    kwargs = {k: v for k, v in kwargs.items() if k in output.writer_options or k not in _WRITER_OPTIONS}
    return output.writer(storage, shard, encoding, **kwargs)
