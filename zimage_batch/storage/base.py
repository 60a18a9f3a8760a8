"""The storage interface: a root (local folder or S3 prefix) holding objects addressed by relative
keys, its errors, and the checks of keys and URIs every backend shares.

Keys are relative, ``/``-separated paths under the storage root. Writes are durable and
whole-object when they return; ``put_if_absent`` is an atomic create-only write. Error messages
never contain credentials.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow.fs as pafs

MiB = 1024 * 1024
#: Scratch keys written by the probes of a store (writable, conditional writes), then deleted.
PROBE_PREFIX = "_probe/"


class StorageError(Exception):
    """A storage problem a user can act on (missing bucket, access denied, ...)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None = None


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")`` (prefix without surrounding slashes)."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in S3 URI: {uri!r}")
    return bucket, prefix.strip("/")


def check_key(key: str) -> str:
    """Validate a relative key: no NUL, no absolute path, no ``..`` component."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid storage key: {key!r}")
    if "\x00" in key:
        raise ValueError(f"storage key contains NUL: {key!r}")
    if key.startswith("/") or key.startswith("\\") or (len(key) > 1 and key[1] == ":"):
        raise ValueError(f"storage key must be relative: {key!r}")
    if ".." in key.replace("\\", "/").split("/"):
        raise ValueError(f"storage key must not contain '..': {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: empty (everything), or a valid key."""
    return check_key(prefix) if prefix else ""


class Storage(ABC):
    """A root (local folder or S3 prefix) holding objects addressed by relative keys."""

    uri: str

    @abstractmethod
    def url(self, key: str) -> str:
        """Full URI (``s3://b/p/key`` or absolute local path) of ``key``."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` to ``key`` (replacing it); durable when this returns."""

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike) -> None:
        """Upload the local file ``path`` to ``key`` (replacing it)."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Atomically create ``key``: True if we created it, False if it already existed."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Contents of ``key``; FileNotFoundError if missing."""

    # Compare-and-swap on one small object (the OUTPUT lease): a version tag read with the
    # contents, and a replace or delete that happens only while the object still has it.
    @abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """Contents of ``key`` and its version tag; FileNotFoundError if missing."""

    @abstractmethod
    def put_if_match(self, key: str, data: bytes, version: str) -> str | None:
        """Replace ``key`` only while it still has ``version`` (atomically): the new version, or
        None when the object changed or is gone."""

    @abstractmethod
    def delete_if_match(self, key: str, version: str) -> bool:
        """Delete ``key`` only while it still has ``version`` (atomically); False otherwise."""

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A seekable, buffered reader of ``key`` that fetches the parts read (a member of a tar,
        a row group of a Parquet file), not the whole object; FileNotFoundError if missing."""

    @abstractmethod
    def download(self, key: str, local_path: str | os.PathLike) -> None:
        """Copy ``key`` to ``local_path`` (parents created); FileNotFoundError if missing."""

    @abstractmethod
    def move(self, src: str, dst: str) -> None:
        """Give object ``src`` the key ``dst`` (replacing it): a rename locally, a server-side
        copy then a delete on S3. A ``src`` already moved (missing, ``dst`` present) is fine. On
        S3 a failed delete of ``src`` is only logged: ``dst`` is right, and the caller removes
        what is left (the ledger's sweep)."""

    @abstractmethod
    def publish_folder(self, src_prefix: str, dst_prefix: str) -> None:
        """Give every object under ``src_prefix`` the same name under ``dst_prefix``: locally one
        rename of the folder (it appears whole, at once), on S3 parallel server-side copies, then
        the sources deleted in batches. Idempotent: a folder already published (``src_prefix``
        gone) is fine, and a publish cut short is finished by calling it again. On S3 a failed
        delete of the sources is only logged: the caller removes what is left (the ledger's sweep)."""

    @abstractmethod
    def child(self, prefix: str) -> Storage:
        """The storage rooted at ``prefix`` under this one (a staging folder, say)."""

    def get_json(self, key: str) -> Any:
        """``key`` parsed as JSON; FileNotFoundError if missing, StorageError naming it if not JSON."""
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise self.unreadable(key, exc) from None

    def unreadable(self, key: str, exc: BaseException) -> StorageError:
        """The error for an object no run wrote (writes are whole): name it, say what to do."""
        return StorageError(f"{self.url(key)} is not valid JSON ({exc}); move it away to go on")

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``, recursively, sorted by key."""

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys``; missing keys are fine."""

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object whose key starts with ``prefix``."""
        self.delete(info.key for info in self.list(prefix))

    @abstractmethod
    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the root path on it (for pyarrow.parquet / dataset)."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raise StorageError unless a probe object can be written and deleted."""

    def supports_create_only(self) -> bool:
        """Whether ``put_if_absent`` refuses a key that exists (locally always: a hard link)."""
        return True

    def supports_compare_and_swap(self) -> bool:
        """Whether ``put_if_match`` refuses a stale version (locally always: a flock)."""
        return True

    def location(self) -> str:
        """Where the objects live, for messages: the folder (S3: the endpoint)."""
        return self.uri

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
