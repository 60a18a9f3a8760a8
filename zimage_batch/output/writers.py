"""Shard writers: one per output format, made by name (`make_writer`).

Each format's writer lives in its module of `zimage_batch.output.formats` (files, webdataset,
parquet), on the life cycle of `output.shard_writer.ShardWriter`; images are encoded by
`output.encoding`. This module makes the writer a job's format names, and keeps the names
callers import from here.
"""

from __future__ import annotations

from zimage_batch.output.encoding import IMAGE_FORMATS, PNG, Encoding, encode_image
from zimage_batch.output.formats import FORMATS, get_format
from zimage_batch.output.formats.files import FilesWriter
from zimage_batch.output.formats.parquet import ParquetWriter
from zimage_batch.output.formats.webdataset import WebDatasetWriter
from zimage_batch.output.shard_writer import ShardWriter
from zimage_batch.storage import Storage

__all__ = [
    "IMAGE_FORMATS",
    "Encoding",
    "encode_image",
    "ShardWriter",
    "FilesWriter",
    "WebDatasetWriter",
    "ParquetWriter",
    "make_writer",
]


def make_writer(fmt: str, storage: Storage, shard: str, encoding: Encoding | str = PNG, **kwargs) -> ShardWriter:
    """The writer for output format ``fmt`` (``files`` | ``webdataset`` | ``parquet``), saving
    images as ``encoding`` says (PNG unless given; an image format's name, ``"jpeg"``, is that
    format at its default quality).

    ``upload_threads`` / ``max_pending`` (keyword only) tune the files writer; ``fields`` (the
    sample's metadata columns, pass-through ones included) are the Parquet writer's columns. Each
    writer ignores the keywords that only other formats' writers take.
    """
    output = get_format(fmt)
    if not isinstance(encoding, Encoding):  # a name ("jpeg") or an ImageFormat: at its default quality
        encoding = Encoding.of(encoding)
    others = {option for other in FORMATS.values() for option in other.writer_options} - set(output.writer_options)
    kwargs = {k: v for k, v in kwargs.items() if k not in others}
    return output.writer(storage, shard, encoding, **kwargs)
