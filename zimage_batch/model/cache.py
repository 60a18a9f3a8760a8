"""A verified local copy of a checkpoint folder on S3.

``fetch_s3_folder("s3://bucket/models/z-image/", root)`` lists the prefix and names a cache
entry after a hash of the (key, ETag, size) list, so a changed checkpoint gets a new entry.
A missing entry is downloaded into a temporary sibling folder, every file is verified (size;
MD5 when the ETag is a plain MD5), ``.zimage-cache.json`` is written, and the folder is renamed
into place: a half-copied cache is never used. Processes on one machine take a file lock so
that only one downloads; the rename keeps it safe even where the lock does not work (NFS).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from zimage_batch.model.checkpoint import ModelSourceError, refuse_pickles
from zimage_batch.storage import ObjectInfo, S3Storage, Storage, check_key, open_storage, split_s3_uri
from zimage_batch.storage.local import fsync_dir

CACHE_MANIFEST = ".zimage-cache.json"
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def fetch_s3_folder(uri: str, cache_root: str | os.PathLike) -> Path:
    """Copy every object under ``uri`` into a verified cache entry below ``cache_root``
    (once per checkpoint version) and return the entry's folder."""
    storage = open_storage(uri)
    objects = [o for o in storage.list() if not o.key.endswith("/")]
    _check_listing(uri, objects)
    return _fetch_entry(storage, objects, Path(cache_root))


def fetch_s3_file(uri: str, cache_root: str | os.PathLike) -> Path:
    """A single object (``s3://bucket/loras/style.safetensors``: an adapter), cached and verified
    like a folder (an entry of one file, keyed by its ETag); returns the local file's path."""
    bucket, key = split_s3_uri(uri)
    folder, _, name = key.rpartition("/")
    if not name:
        raise ModelSourceError(f"{uri} names no object")
    storage = open_storage(f"s3://{bucket}/{folder}")
    objects = [o for o in storage.list(name) if o.key == name]
    if not objects:
        raise ModelSourceError(f"no object at {uri}")
    _check_listing(uri, objects)
    return _fetch_entry(storage, objects, Path(cache_root)) / name


def _fetch_entry(storage: Storage, objects: list[ObjectInfo], root: Path) -> Path:
    """The verified cache entry holding `objects` of `storage`, downloaded once."""
    root.mkdir(parents=True, exist_ok=True)
    entry = root / _entry_name(storage, objects)
    if _is_complete(entry, objects):
        return entry
    with _file_lock(root / f".{entry.name}.lock"):
        if _is_complete(entry, objects):  # another process finished it while we waited
            return entry
        _remove_stale_scratch(root)
        if entry.exists():  # damaged (a file deleted or truncated by hand): replace it
            _discard(entry, root)
        tmp = root / _scratch_name("tmp", entry.name)
        try:
            _download_all(storage, objects, tmp)
            _publish(tmp, entry, objects)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _check_listing(uri: str, objects: list[ObjectInfo]) -> None:
    if not objects:
        raise ModelSourceError(f"no objects under {uri}")
    refuse_pickles((o.key for o in objects), f"checkpoint {uri}")
    for o in objects:
        check_key(o.key)  # no '..' or absolute keys: nothing may land outside the entry
        if o.key == CACHE_MANIFEST:
            raise ModelSourceError(f"{uri} holds a {CACHE_MANIFEST}; it is reserved for the cache")


def _entry_name(storage: Storage, objects: list[ObjectInfo]) -> str:
    listing = json.dumps(sorted((o.key, o.etag, o.size) for o in objects), ensure_ascii=False)
    digest = hashlib.sha256(listing.encode()).hexdigest()[:24]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", storage.uri.removeprefix("s3://")).strip("._")[:80]
    return f"{slug}-{digest}"


def _expected(objects: list[ObjectInfo]) -> dict[str, dict]:
    return {o.key: {"size": o.size, "etag": o.etag} for o in objects}


def _is_complete(entry: Path, objects: list[ObjectInfo]) -> bool:
    """The entry's manifest matches the listing and every file is there with its size."""
    try:
        manifest = json.loads((entry / CACHE_MANIFEST).read_text())
        if manifest.get("files") != _expected(objects):
            return False
        return all((entry / o.key).stat().st_size == o.size for o in objects)
    except (OSError, ValueError):
        return False


def _download_all(storage: Storage, objects: list[ObjectInfo], tmp: Path) -> None:
    tmp.mkdir()
    for o in objects:
        path = tmp / o.key
        storage.download(o.key, path)
        _verify(storage, o, path)
    manifest = {"source": storage.uri, "created": time.time(), "files": _expected(objects)}
    _write_synced(tmp / CACHE_MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False).encode())


def _verify(storage: Storage, o: ObjectInfo, path: Path) -> None:
    """Size always; MD5 when the ETag is a plain MD5 (not multipart). Also fsyncs the file."""
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            md5.update(chunk)
        os.fsync(f.fileno())
        size = f.tell()
    where = storage.url(o.key)
    if size != o.size:
        raise OSError(f"download of {where} is {size} bytes, expected {o.size}")
    etag = (o.etag or "").lower()
    if _MD5_ETAG.match(etag) and md5.hexdigest() != etag and not _etag_is_not_md5(storage, o.key):
        raise OSError(f"download of {where} does not match its ETag (MD5 {md5.hexdigest()} != {etag})")


def _etag_is_not_md5(storage: Storage, key: str) -> bool:
    """SSE-KMS and SSE-C objects have 32-hex ETags that are not the MD5 of their content."""
    if not isinstance(storage, S3Storage):
        return False
    head = storage.head(key)
    return str(head.get("ServerSideEncryption", "")).startswith("aws:kms") or bool(
        head.get("SSECustomerAlgorithm"))


def _publish(tmp: Path, entry: Path, objects: list[ObjectInfo]) -> None:
    """Rename the complete folder into place; if an entry appeared meanwhile, keep that one."""
    fsync_dir(tmp)
    try:
        os.rename(tmp, entry)
    except OSError:
        if not _is_complete(entry, objects):
            raise
        return  # another process published the same checkpoint first; tmp is removed by caller
    fsync_dir(entry.parent)


def _scratch_name(kind: str, name: str) -> str:
    """``.<kind>-<pid>-<host>-<random>-<entry>``: lets a later call spot dead owners."""
    return f".{kind}-{os.getpid()}-{_HOST}-{uuid.uuid4().hex[:8]}-{name}"


def _remove_stale_scratch(root: Path) -> None:
    """Remove temporary/trash folders whose owning process on this machine has died."""
    for child in root.iterdir():
        parts = child.name.split("-", 4)
        if len(parts) != 5 or parts[0] not in (".tmp", ".trash") or parts[2] != _HOST:
            continue
        try:
            pid = int(parts[1])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(child, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _discard(entry: Path, root: Path) -> None:
    trash = root / _scratch_name("trash", entry.name)
    try:
        os.rename(entry, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock); a no-op where the filesystem refuses it."""
    import fcntl

    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:
            pass
        yield  # closing the file releases the lock


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
