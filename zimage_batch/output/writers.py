"""Shard writers: one per output format.

A writer stores the images of one shard under OUTPUT, through a :class:`~zimage_batch.storage.Storage`:

``files``       ``images/<shard>/<key>.<ext>``, one object per image, uploaded as samples arrive.
``webdataset``  ``shards/<shard>.tar`` with ``<key>.<ext>``, ``<key>.txt`` (the prompt, the caption
                training loaders read) and ``<key>.json`` (the settings) per sample.
``parquet``     ``data/<shard>.parquet``: ``__key__``, ``id``, ``image`` (a struct of ``bytes`` and
                ``path``, declared as a Hugging Face ``Image`` in the schema metadata), ``prompt``
                and the rest of the sample's metadata.

Usage: ``add()`` each sample (it returns the value of the metadata ``image`` column), then
``close()``; only when ``close()`` returns is everything durable. ``abort()`` (or leaving a
``with`` block on an exception) discards local temporary files. The worker gives each attempt
a storage rooted at its own staging folder (``output.layout.StagingArea``), so what a writer
stores is published under the same names only once the shard is committed.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from zimage_batch import scratch
from zimage_batch.metadata_schema import METADATA_COLUMNS
from zimage_batch.output import layout
from zimage_batch.output.features import IMAGE_STRUCT, sample_fields, with_features
from zimage_batch.output.keys import KEY_RE
from zimage_batch.run.threads import background_pool
from zimage_batch.storage import Storage

__all__ = [
    "IMAGE_FORMATS",
    "OUTPUT_FORMATS",
    "ImageFormat",
    "get_image_format",
    "encode_image",
    "ShardWriter",
    "FilesWriter",
    "WebDatasetWriter",
    "ParquetWriter",
    "make_writer",
]


@dataclass(frozen=True)
class ImageFormat:
    """How one image format is saved: file extension, PIL format name, fixed save options."""

    ext: str
    pil_format: str
    save_args: dict = field(default_factory=dict)
    lossy: bool = False


# Fixed save options so the same pixels always give the same bytes (and the same sha256).
IMAGE_FORMATS: dict[str, ImageFormat] = {
    "png": ImageFormat("png", "PNG", {"compress_level": 6, "optimize": False}),
    "jpeg": ImageFormat("jpg", "JPEG", {"optimize": False, "progressive": False}, lossy=True),
    "webp": ImageFormat("webp", "WEBP", {"method": 4, "lossless": False, "exact": False}, lossy=True),
}
_FORMAT_ALIASES = {"jpg": "jpeg"}

OUTPUT_FORMATS = layout.FORMATS

# Shard names become a path component: no slashes, no leading dot (so never "." or "..").
_SHARD_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\Z")
_KEY_MAX = 200
MASK_IMAGE_COLUMN = "mask_image"  # --format parquet: the inpaint mask as used, in a job that keeps masks
_SHARD_MAX = 200


def get_image_format(name: "str | ImageFormat") -> ImageFormat:
    """The :class:`ImageFormat` for ``png`` / ``jpeg`` (or ``jpg``) / ``webp``; ValueError otherwise."""
    if isinstance(name, ImageFormat):
        return name
    fmt = IMAGE_FORMATS.get(_FORMAT_ALIASES.get(str(name).lower(), str(name).lower()))
    if fmt is None:
        raise ValueError(f"unknown image format {name!r}; expected one of {', '.join(IMAGE_FORMATS)}")
    return fmt


def _check_quality(quality: int) -> int:
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be an integer in 1..100, got {quality!r}")
    return int(quality)


def encode_image(pixels: "np.ndarray | Image.Image", image_format: str = "png", quality: int = 95) -> bytes:
    """Encode an image (uint8 ``HxWx3`` array or PIL image) to PNG, JPEG or WebP bytes.

    ``quality`` (1..100) applies to JPEG and WebP; PNG is lossless and ignores it. PIL images
    that are not RGB are converted to RGB. Output carries no timestamps or other metadata.
    """
    fmt = get_image_format(image_format)
    quality = _check_quality(quality)
    if isinstance(pixels, Image.Image):
        img = pixels if pixels.mode == "RGB" else pixels.convert("RGB")
    else:
        arr = np.asarray(pixels)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"pixels must be a non-empty uint8 HxWx3 array, got {arr.dtype} {arr.shape}")
        img = Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
    args = dict(fmt.save_args)
    if fmt.lossy:
        args["quality"] = quality
    buf = io.BytesIO()
    img.save(buf, format=fmt.pil_format, **args)
    return buf.getvalue()


def _check_shard(shard: str) -> str:
    if not isinstance(shard, str) or len(shard) > _SHARD_MAX or not _SHARD_RE.match(shard):
        raise ValueError(f"invalid shard name {shard!r}: use [A-Za-z0-9_.-], not starting with '.'")
    return shard


def _check_key(key: str) -> str:
    if not isinstance(key, str) or len(key) > _KEY_MAX or not KEY_RE.match(key):
        raise ValueError(f"invalid sample key {key!r}: use keys.safe_key(id)")
    return key


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"image_bytes must be bytes, got {type(data).__name__}")


class ShardWriter(ABC):
    """Writes the images of one shard. Not thread-safe: one caller drives it.

    Subclasses implement ``_add`` / ``_close`` / ``_abort``; the base class validates keys,
    refuses duplicates within the shard, and tracks the writer's state.
    """

    output_format: str = ""

    def __init__(self, storage: Storage, shard: str, image_format: str = "png", quality: int = 95) -> None:
        self.storage = storage
        self.shard = _check_shard(shard)
        self.image_format = get_image_format(image_format)
        self.quality = _check_quality(quality)
        self._keys: list[str] = []
        self._seen: set[str] = set()
        self._state = "open"  # open | closed | aborted | failed

    # -- public API ---------------------------------------------------------------------------
    @property
    def ext(self) -> str:
        """File extension of the images (``png``, ``jpg``, ``webp``)."""
        return self.image_format.ext

    @property
    def closed(self) -> bool:
        return self._state != "open"

    @property
    def keys(self) -> list[str]:
        """Sample keys added so far, in order."""
        return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    #: The metadata field a sample's caption (WebDataset ``<key>.txt``) holds: `prompt_original`
    #: in a job that expands prompts with `caption: original`.
    caption_field = "prompt"

    def add(self, key: str, image_bytes: bytes, meta: dict, mask: bytes | None = None) -> str:
        """Store one sample (and its inpaint mask as used, a PNG, as ``<key>.mask.png`` or the
        Parquet ``mask_image`` column); return the value for the metadata ``image`` column."""
        self._check_open()
        key = _check_key(key)
        if key in self._seen:
            raise ValueError(f"duplicate key {key!r} in shard {self.shard!r}")
        data = _as_bytes(image_bytes)
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        location = self._add(key, data, meta, None if mask is None else _as_bytes(mask))
        self._seen.add(key)
        self._keys.append(key)
        return location

    def close(self) -> None:
        """Finish the shard: when this returns, everything is durable in storage."""
        self._check_open()
        try:
            self._close()
        except BaseException:
            self._state = "failed"
            self._safe_abort()
            raise
        self._state = "closed"

    def abort(self) -> None:
        """Give up on the shard and discard local temporary files. Safe to call any time."""
        if self._state in ("aborted", "closed"):
            return
        self._state = "aborted"
        self._abort()

    def __enter__(self):
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> bool:
        if exc_type is None and self._state == "open":
            self.close()
        else:
            self.abort()
        return False

    def __del__(self):  # last resort: never leave temp files behind
        try:
            if getattr(self, "_state", None) == "open":
                self._safe_abort()
        except Exception:
            pass

    # -- for subclasses -----------------------------------------------------------------------
    @abstractmethod
    def _add(self, key: str, data: bytes, meta: dict, mask: bytes | None = None) -> str: ...

    @abstractmethod
    def _close(self) -> None: ...

    @abstractmethod
    def _abort(self) -> None: ...

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"{type(self).__name__} for shard {self.shard!r} is {self._state}")

    def _safe_abort(self) -> None:
        try:
            self._abort()
        except Exception:
            pass


class _TempDirMixin:
    """A private local temp dir inside the process's scratch folder (`zimage_batch.scratch`:
    removed on a signal, or by the next worker on the node when this process was killed),
    removed on close/abort."""

    _tmpdir: str | None = None

    def _make_tmpdir(self, prefix: str) -> str:
        self._tmpdir = scratch.mkdtemp(prefix)
        return self._tmpdir

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            scratch.release(self._tmpdir)
            self._tmpdir = None


# ---------------------------------------------------------------------------------------------
class FilesWriter(ShardWriter):
    """``images/<shard>/<key>.<ext>``, uploaded on a small thread pool while the caller goes on.

    At most ``max_pending`` uploads are queued; ``add`` blocks beyond that, which bounds memory.
    The first failed upload is raised by the next ``add`` or by ``close``.
    """

    output_format = "files"

    def __init__(self, storage: Storage, shard: str, image_format: str = "png", quality: int = 95, *,
                 upload_threads: int = 8, max_pending: int = 32) -> None:
        super().__init__(storage, shard, image_format, quality)
        if upload_threads < 1 or max_pending < 1:
            raise ValueError("upload_threads and max_pending must be >= 1")
        self.prefix = layout.images_prefix(self.shard)
        self._pool = background_pool(upload_threads, f"upload-{self.shard}")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._futures: list[Future] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def object_key(self, key: str) -> str:
        return layout.image_key(self.shard, key, self.ext)

    def _add(self, key: str, data: bytes, meta: dict, mask: bytes | None = None) -> str:
        self._raise_error()
        obj = self.object_key(key)
        self._upload(obj, data)
        if mask is not None:
            self._upload(layout.mask_key(self.shard, key), mask)
        return obj

    def _upload(self, obj: str, data: bytes) -> None:
        self._slots.acquire()
        try:
            fut = self._pool.submit(self.storage.put_bytes, obj, data)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(self._done)
        self._futures.append(fut)

    def _done(self, fut: Future) -> None:
        self._slots.release()
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            with self._lock:
                if self._error is None:
                    self._error = exc

    def _raise_error(self) -> None:
        with self._lock:
            exc = self._error
        if exc is not None:
            raise exc

    def _close(self):
        try:
            for fut in self._futures:
                fut.exception()  # wait for every upload, successful or not
        finally:
            self._pool.shutdown(wait=True)
        self._raise_error()

    def _abort(self):
        for fut in self._futures:
            fut.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
def _json_clean(obj: Any) -> Any:
    """Make metadata strictly JSON-able: non-finite floats become null, keys become strings."""
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_json_clean(v) for v in obj), key=lambda v: json.dumps(v, default=str))
    if type(obj).__name__ in ("NAType", "NaTType"):  # pandas.NA / pandas.NaT
        return None
    if isinstance(obj, np.ndarray):
        return _json_clean(obj.tolist())
    if isinstance(obj, np.generic):
        return _json_clean(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).hex()
    iso = getattr(obj, "isoformat", None)
    if callable(iso):
        return iso()
    return str(obj)


def meta_json(meta: dict) -> bytes:
    """The ``<key>.json`` member: UTF-8, unescaped non-ASCII, sorted keys, strict JSON."""
    return json.dumps(
        _json_clean(meta), ensure_ascii=False, sort_keys=True, default=_json_default, allow_nan=False
    ).encode("utf-8")


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _caption(meta: dict, field: str = "prompt") -> bytes:
    """The ``<key>.txt`` member: the prompt (or the metadata `field` the writer's `caption_field`
    names), UTF-8 (empty when a sample has none)."""
    prompt = meta.get(field)
    return b"" if prompt is None else str(prompt).encode("utf-8")


class WebDatasetWriter(_TempDirMixin, ShardWriter):
    """``shards/<shard>.tar``: streamed to a local temp tar, uploaded by ``close()``.

    The tar is deterministic (mtime 0, uid/gid 0, no user names, mode 0644); an empty shard
    still gets a (valid, empty) tar so every committed shard has its object.
    """

    output_format = "webdataset"

    def __init__(self, storage: Storage, shard: str, image_format: str = "png", quality: int = 95) -> None:
        super().__init__(storage, shard, image_format, quality)
        self.object = layout.tar_key(self.shard)
        self._path = os.path.join(self._make_tmpdir("zimage-wds-"), f"{self.shard}.tar")
        self._tar: tarfile.TarFile | None = tarfile.open(self._path, "w", format=tarfile.PAX_FORMAT)

    def _add(self, key: str, data: bytes, meta: dict, mask: bytes | None = None) -> str:
        js = meta_json(meta)  # fail on bad metadata before anything is written
        caption = _caption(meta, self.caption_field)
        img_name = f"{key}.{self.ext}"
        self._tar.addfile(_tar_member(img_name, len(data)), io.BytesIO(data))
        if mask is not None:
            self._tar.addfile(_tar_member(f"{key}{layout.MASK_SUFFIX}", len(mask)), io.BytesIO(mask))
        self._tar.addfile(_tar_member(f"{key}.txt", len(caption)), io.BytesIO(caption))
        self._tar.addfile(_tar_member(f"{key}.json", len(js)), io.BytesIO(js))
        return f"{self.object}#{img_name}"

    def _close(self):
        self._tar.close()
        self._tar = None
        self.storage.put_file(self.object, self._path)
        self._remove_tmpdir()

    def _abort(self):
        if self._tar is not None:
            try:
                self._tar.close()
            except Exception:
                pass
            self._tar = None
        self._remove_tmpdir()


# ---------------------------------------------------------------------------------------------
class ParquetWriter(_TempDirMixin, ShardWriter):
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

    def __init__(self, storage: Storage, shard: str, image_format: str = "png", quality: int = 95, *,
                 fields: pa.Schema | None = None) -> None:
        super().__init__(storage, shard, image_format, quality)
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
        if MASK_IMAGE_COLUMN in row:
            row[MASK_IMAGE_COLUMN] = None if mask is None else {"bytes": mask, "path": f"{key}{layout.MASK_SUFFIX}"}
        self._rows.append(row)
        self._buffered += len(data)
        if self._buffered >= self.ROW_GROUP_BYTES or len(self._rows) >= self.ROW_GROUP_ROWS:
            self._flush()
        return f"{self.object}#{key}"

    def _writer(self):
        if self._pq_writer is None:
            import pyarrow.parquet as pq

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
        rest.append(pa.field(MASK_IMAGE_COLUMN, IMAGE_STRUCT))
    images = {"image", MASK_IMAGE_COLUMN} if "mask_sha256" in fields.names else {"image"}
    return with_features(pa.schema(first + rest), images=images)


# ---------------------------------------------------------------------------------------------
_WRITERS = {"files": FilesWriter, "webdataset": WebDatasetWriter, "parquet": ParquetWriter}


def make_writer(fmt: str, storage: Storage, shard: str, image_format: str = "png", quality: int = 95, **kwargs) -> ShardWriter:
    """The writer for output format ``fmt`` (``files`` | ``webdataset`` | ``parquet``).

    ``upload_threads`` / ``max_pending`` (keyword only) tune the files writer; ``fields`` (the
    sample's metadata columns, pass-through ones included) are the Parquet writer's columns. Each
    writer ignores the others' keywords.
    """
    cls = _WRITERS.get(fmt)
    if cls is None:
        raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(OUTPUT_FORMATS)}")
    own = {FilesWriter: ("upload_threads", "max_pending"), ParquetWriter: ("fields",)}.get(cls, ())
    known = ("upload_threads", "max_pending", "fields")
    kwargs = {k: v for k, v in kwargs.items() if k in own or k not in known}
    return cls(storage, shard, image_format, quality, **kwargs)
