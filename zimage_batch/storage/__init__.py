"""Local folders and ``s3://bucket/prefix`` behind one small interface (`Storage`).

Keys are relative, ``/``-separated paths under the storage root. Writes are durable and
whole-object when they return; ``put_if_absent`` is an atomic create-only write (S3
conditional writes, ``os.link`` locally). S3 settings come from the standard AWS chain
(environment, profile, ``AWS_ENDPOINT_URL`` for S3-compatible stores); retries come from
botocore's retry configuration. Error messages never contain credentials.

One module per part: `base` (the interface, its errors, keys and URIs), `local` (a folder),
`s3` (an S3 prefix through boto3), `s3_client` (the shared client, its retries, error codes,
pyarrow's S3 filesystem), `s3_conditional` (create-only writes, compare-and-swap and their probes).
Whether a run may write to a store is the run's rule (`run/output_store.py`), not the store's.
"""

from __future__ import annotations

import os

from zimage_batch.storage.base import (
    PROBE_PREFIX,
    MiB,
    ObjectInfo,
    Storage,
    StorageError,
    check_key,
    is_s3,
    split_s3_uri,
)
from zimage_batch.storage.local import LocalStorage
from zimage_batch.storage.s3 import S3Storage
from zimage_batch.storage.s3_client import s3_client

__all__ = ["PROBE_PREFIX", "LocalStorage", "MiB", "ObjectInfo", "S3Storage", "Storage", "StorageError",
           "check_key", "is_s3", "open_storage", "s3_client", "split_s3_uri"]


def open_storage(uri: str) -> Storage:
    """``s3://...`` -> :class:`S3Storage`; a path or ``file://`` URI -> :class:`LocalStorage`."""
    uri = os.fspath(uri)
    return S3Storage(uri) if is_s3(uri) else LocalStorage(uri)
