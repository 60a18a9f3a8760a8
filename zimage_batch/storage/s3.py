"""An ``s3://bucket/prefix`` as a `Storage`, through the shared boto3 client: uploads retried as a
whole, reads whose body was cut off read again, server-side copies for moves and folder
publishes, batched deletes, and ranged reads for `open_read`."""

from __future__ import annotations

import io
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TypeVar

import pyarrow.fs as pafs

from zimage_batch.storage.base import PROBE_PREFIX, MiB, ObjectInfo, Storage, StorageError, check_key, check_prefix, split_s3_uri
from zimage_batch.storage.s3_client import error_code, http_status, is_not_found, s3_arrow_fs, s3_client, transient
from zimage_batch.storage.s3_conditional import S3ConditionalWrites

#: Files larger than this are uploaded/downloaded with S3 multipart transfers.
MULTIPART_THRESHOLD = 64 * MiB
#: Part size of S3 multipart transfers.
MULTIPART_CHUNKSIZE = 64 * MiB
#: Whole-object upload attempts (botocore retries single requests; this retries a
#: multipart upload that failed midway as a whole).
UPLOAD_ATTEMPTS = 3
#: Reads of an object whose body was cut off midway (botocore retries only until the headers).
READ_ATTEMPTS = 5
READ_BLOCK = 256 * 1024  # bytes fetched at a time by open_read on S3
#: Keys are deleted in batches of this size (the S3 DeleteObjects limit).
DELETE_BATCH = 1000
#: Server-side copies in flight while an S3 folder is published.
COPY_THREADS = 16
#: Objects up to this size are copied with one CopyObject request (the S3 limit); larger ones
#: with a multipart copy.
COPY_OBJECT_MAX = 5 * 1024 * MiB

T = TypeVar("T")


class S3Storage(S3ConditionalWrites, Storage):
    """An ``s3://bucket/prefix`` root, through the shared boto3 client."""

    def __init__(self, uri: str, *, multipart_threshold: int | None = None,
                 multipart_chunksize: int | None = None):
        self.bucket, self.prefix = split_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.multipart_threshold = multipart_threshold or MULTIPART_THRESHOLD
        self.multipart_chunksize = multipart_chunksize or MULTIPART_CHUNKSIZE

    @property
    def client(self) -> Any:
        return s3_client()

    def _key(self, key: str) -> str:
        check_key(key.rstrip("/") or key)  # folder markers end in "/"
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1:] if self.prefix else full_key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def child(self, prefix: str) -> S3Storage:
        return S3Storage(self.url(prefix.rstrip("/")))

    def location(self) -> str:
        return f"the S3 endpoint {self.client.meta.endpoint_url}"

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_chunksize)

    def _raise_storage_error(self, e: Exception, action: str, key: str | None = None) -> None:
        """Re-raise bucket-level failures as StorageError (code only, never credentials)."""
        code = error_code(e) or ("NoSuchBucket" if "NoSuchBucket" in str(e) else "")
        if not code and "AccessDenied" in str(e):
            code = "AccessDenied"
        where = self.url(key) if key else self.uri
        if code == "NoSuchBucket":
            raise StorageError(f"bucket '{self.bucket}' does not exist ({self.uri})") from None
        if code in ("AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId",
                    "SignatureDoesNotMatch", "ExpiredToken") or http_status(e) == 403:
            raise StorageError(f"access denied {action} {where} ({code or 403})") from None

    def _upload(self, fn: Callable[[], T], key: str) -> T:
        for attempt in range(UPLOAD_ATTEMPTS):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below
                self._raise_storage_error(e, "writing to", key)
                if attempt + 1 == UPLOAD_ATTEMPTS or not transient(e):
                    raise
                time.sleep(min(8.0, 0.5 * 2 ** attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._key(key)
        self._upload(lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data), key)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        full = self._key(key)
        self._upload(lambda: self.client.upload_file(os.fspath(path), self.bucket, full,
                                                     Config=self._transfer_config()), key)

    def get_bytes(self, key: str) -> bytes:
        return self.get_range(key)

    def get_range(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes [start, end) of ``key`` (to its end when ``end`` is None)."""
        ranged = {} if (start, end) == (0, None) else {"Range": f"bytes={start}-{'' if end is None else end - 1}"}
        return self._fetch(key, **ranged)[0]

    def _fetch(self, key: str, **request: Any) -> tuple[bytes, str]:
        """One GET of ``key``: its body and ETag. botocore retries the request (5xx, throttling);
        a body cut off midway (outside its retries) is read again."""
        import botocore.exceptions
        import urllib3.exceptions

        cut_off = (botocore.exceptions.ResponseStreamingError, botocore.exceptions.IncompleteReadError,
                   botocore.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError)
        for attempt in range(READ_ATTEMPTS):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **request)
                return response["Body"].read(), response["ETag"]
            except botocore.exceptions.ClientError as e:
                self._raise_read_error(e, key)
            except cut_off:
                if attempt + 1 == READ_ATTEMPTS:
                    raise
                time.sleep(min(4.0, 0.2 * 2 ** attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def open_read(self, key: str) -> BinaryIO:
        size = int(self.head(key)["ContentLength"])
        return io.BufferedReader(_RangeReader(self, key, size), buffer_size=READ_BLOCK)

    def download(self, key: str, local_path: str | os.PathLike) -> None:
        import botocore.exceptions

        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        try:
            # s3transfer writes a temporary file and renames it into place.
            self.client.download_file(self.bucket, self._key(key), os.fspath(local_path),
                                      Config=self._transfer_config())
        except botocore.exceptions.ClientError as e:
            self._raise_read_error(e, key)

    def move(self, src: str, dst: str) -> None:
        """The copy is the move: a failed delete of ``src`` after it is logged, not raised."""
        self._copy(src, dst)
        self._delete_sources([src], dst)

    def publish_folder(self, src_prefix: str, dst_prefix: str) -> None:
        """S3 has no folder rename: the copies run in parallel (server-side, no bytes through
        us), then the sources go in DeleteObjects batches. The folder is published once the
        copies are done: a failed delete of the sources is logged, and left to the caller."""
        objects = list(self.list(src_prefix))
        with ThreadPoolExecutor(max_workers=COPY_THREADS, thread_name_prefix="publish") as pool:
            list(pool.map(lambda info: self._copy(info.key, dst_prefix + info.key[len(src_prefix):], info.size),
                          objects))
        self._delete_sources([info.key for info in objects], dst_prefix)

    def _delete_sources(self, keys: list[str], published: str) -> None:
        try:
            self.delete(keys)
        except Exception as exc:  # noqa: BLE001 - published all the same; the caller sweeps the sources
            logging.getLogger(__name__).warning("published %s, but removing its sources failed: %s", published, exc)

    def _copy(self, src: str, dst: str, size: int | None = None) -> None:
        """Server-side copy of ``src`` to ``dst``: one CopyObject when the size is known and
        small enough, else a managed (multipart) copy. A ``src`` gone with ``dst`` there is fine."""
        import botocore.exceptions

        source, target = {"Bucket": self.bucket, "Key": self._key(src)}, self._key(dst)
        one_request = size is not None and size <= COPY_OBJECT_MAX
        try:
            self._upload(lambda: self.client.copy_object(CopySource=source, Bucket=self.bucket, Key=target) if one_request
                         else self.client.copy(source, self.bucket, target, Config=self._transfer_config()), dst)
        except botocore.exceptions.ClientError as e:
            if not is_not_found(e):
                raise
            if self.exists(dst):
                return  # moved already
            raise FileNotFoundError(f"no such object: {self.url(src)}") from None

    def _raise_read_error(self, e: Exception, key: str) -> NoReturn:
        """Translate a failed read: FileNotFoundError, StorageError (bucket-level), or the error itself."""
        if is_not_found(e):
            raise FileNotFoundError(f"no such object: {self.url(key)}") from None
        self._raise_storage_error(e, "reading", key)
        raise e

    def head(self, key: str) -> dict:
        """The raw HeadObject response of ``key``; FileNotFoundError if missing."""
        import botocore.exceptions

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except botocore.exceptions.ClientError as e:
            self._raise_read_error(e, key)

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
            return True
        except FileNotFoundError:
            return False

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """S3 lists keys in UTF-8 byte order, which is Python's str order: already sorted.
        Folder markers (keys ending in ``/``, e.g. from pyarrow's create_dir) are skipped."""
        return (info for info in self._list(prefix) if not info.key.endswith("/"))

    def delete_prefix(self, prefix: str) -> None:
        self.delete(info.key for info in self._list(prefix))  # folder markers too

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        import botocore.exceptions

        check_prefix(prefix)
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full_prefix)
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(self._rel(obj["Key"]), int(obj["Size"]),
                                     obj.get("ETag", "").strip('"') or None)
        except botocore.exceptions.ClientError as e:
            self._raise_storage_error(e, "listing", None)
            raise

    def delete(self, keys: Iterable[str]) -> None:
        batch: list[str] = []
        for key in keys:
            batch.append(self._key(key))
            if len(batch) == DELETE_BATCH:
                _delete_batch(self, batch)
                batch = []
        if batch:
            _delete_batch(self, batch)

    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        return s3_arrow_fs(self.bucket, self.prefix)

    def check_writable(self) -> None:
        key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=b"probe")
            self.delete([key])
        except Exception as e:  # noqa: BLE001 - translated to a one-line reason
            self._raise_storage_error(e, "writing to", None)
            code = error_code(e) or type(e).__name__
            raise StorageError(f"cannot write to {self.uri} ({code})") from None


def _delete_batch(storage: S3Storage, full_keys: list[str]) -> None:
    """One DeleteObjects request; StorageError naming the keys S3 could not delete."""
    import botocore.exceptions

    try:
        response = storage.client.delete_objects(
            Bucket=storage.bucket,
            Delete={"Objects": [{"Key": k} for k in full_keys], "Quiet": True})
    except botocore.exceptions.ClientError as e:
        storage._raise_storage_error(e, "deleting from", None)
        raise
    errors = [err for err in response.get("Errors", []) if err.get("Code") != "NoSuchKey"]
    if errors:
        first = errors[0]
        raise StorageError(f"could not delete {len(errors)} object(s) under {storage.uri}, "
                           f"e.g. {first.get('Key')!r}: {first.get('Code')}")



class _RangeReader(io.RawIOBase):
    """An S3 object as a seekable raw stream: each read is one ranged GET, retried like get_bytes."""

    def __init__(self, storage: S3Storage, key: str, size: int) -> None:
        self.storage, self.key, self.size, self.position = storage, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer: bytearray | memoryview) -> int:
        end = min(self.size, self.position + len(buffer))
        if end <= self.position:
            return 0
        data = self.storage.get_range(self.key, self.position, end)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)
