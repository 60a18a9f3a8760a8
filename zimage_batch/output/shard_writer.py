"""The life cycle every output format's shard writer shares (`ShardWriter`): checked keys, no
duplicates within a shard, ``add`` / ``close`` / ``abort``; and the private scratch folder of
writers that build a shard's file locally before uploading it (`TempDirMixin`).

Usage: ``add()`` each sample (it returns the value of the metadata ``image`` column), then
``close()``; only when ``close()`` returns is everything durable. ``abort()`` (or leaving a
``with`` block on an exception) discards local temporary files. The worker gives each attempt
a storage rooted at its own staging folder (``output.layout.StagingArea``), so what a writer
stores is published under the same names only once the shard is committed.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any

from zimage_batch import scratch
from zimage_batch.output.encoding import PNG, Encoding
from zimage_batch.output.keys import KEY_RE
from zimage_batch.storage import Storage

__all__ = ["ShardWriter", "TempDirMixin"]

# Shard names become a path component: no slashes, no leading dot (so never "." or "..").
_SHARD_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\Z")
_KEY_MAX = 200
_SHARD_MAX = 200


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

    def __init__(self, storage: Storage, shard: str, encoding: Encoding = PNG) -> None:
        self.storage = storage
        self.shard = _check_shard(shard)
        self.encoding = encoding
        self._keys: list[str] = []
        self._seen: set[str] = set()
        self._state = "open"  # open | closed | aborted | failed

    # -- public API ---------------------------------------------------------------------------
    @property
    def ext(self) -> str:
        """File extension of the images (``png``, ``jpg``, ``webp``)."""
        return self.encoding.ext

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


class TempDirMixin:
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
