"""Local folders and ``s3://bucket/prefix`` behind one small interface.

Keys are relative, ``/``-separated paths under the storage root. Writes are durable and
whole-object when they return; ``put_if_absent`` is an atomic create-only write (S3
conditional writes, ``os.link`` locally). S3 settings come from the standard AWS chain
(environment, profile, ``AWS_ENDPOINT_URL`` for S3-compatible stores); retries come from
botocore's retry configuration. Error messages never contain credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TypeVar
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

MiB = 1024 * 1024
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
PROBE_PREFIX = "_probe/"
# Local temporary files start with this; list() hides them.
_TMP_MARK = ".~zb-tmp-"

T = TypeVar("T")


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


def open_storage(uri: str) -> Storage:
    """``s3://...`` -> :class:`S3Storage`; a path or ``file://`` URI -> :class:`LocalStorage`."""
    uri = os.fspath(uri)
    return S3Storage(uri) if is_s3(uri) else LocalStorage(uri)


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


#: The job setting that runs on a store whose create-only writes do not hold.
UNSAFE_OPT_OUT = "unsafe_allow_overwriting_commits"


def check_output_store(storage: Storage, allow_overwriting_commits: bool = False) -> None:
    """Preflight of an OUTPUT, once per run before any work: it must be writable, and its
    conditional writes must hold: create-only for commit markers (each shard's output exactly
    once), compare-and-swap for the lease (one run at a time). A store that ignores them is
    refused in one line unless the job opts out (a single writer at a time, accepting the risk),
    when it is only logged."""
    storage.check_writable()
    if not storage.supports_create_only():
        problem = (f"{_endpoint(storage)} ignores create-only writes (it accepted a second PutObject with "
                   f"If-None-Match: * of one key under {storage.uri}), so two runs could both commit a shard "
                   "and exactly-once output cannot be guaranteed")
    elif not storage.supports_compare_and_swap():
        problem = (f"{_endpoint(storage)} ignores If-Match (it accepted a PutObject naming another ETag under "
                   f"{storage.uri}), so two runs could both hold the lease that keeps them from writing one OUTPUT "
                   "at once, and exactly-once output cannot be guaranteed")
    else:
        return
    if not allow_overwriting_commits:
        raise StorageError(f"{problem}; use a store that enforces conditional writes, or, if only one run "
                           f"ever writes this OUTPUT at a time, accept the risk with --set {UNSAFE_OPT_OUT}=true")
    logging.getLogger(__name__).warning("%s; running anyway (%s=true)", problem, UNSAFE_OPT_OUT)


def _endpoint(storage: Storage) -> str:
    """Where the objects live, for messages: the S3 endpoint, or the folder."""
    return f"the S3 endpoint {storage.client.meta.endpoint_url}" if isinstance(storage, S3Storage) else storage.uri


def check_scratch_space(needed: int, folder: str | None = None) -> None:
    """Raise StorageError when the folder for temporary files (TMPDIR) has under ``needed`` bytes free."""
    folder = folder or tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if needed and free < needed:
        raise StorageError(
            f"not enough scratch space in {folder}: {free / MiB:.0f} MiB free, a shard needs about "
            f"{needed / MiB:.0f} MiB; set TMPDIR to a larger disk or lower shard_size"
        )


def _check_prefix(prefix: str) -> str:
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

    def child(self, prefix: str) -> Storage:
        """The storage rooted at ``prefix`` under this one (a staging folder, say)."""
        return open_storage(self.url(prefix.rstrip("/")))

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


# --------------------------------------------------------------------------- local


class LocalStorage(Storage):
    """A local folder. Writes go to a temporary file in the same folder, are fsynced and
    then renamed (or hard-linked, for put_if_absent) into place."""

    def __init__(self, uri: str | os.PathLike):
        uri = os.fspath(uri)
        if uri.startswith("file://"):
            uri = unquote(urlparse(uri).path)
        self.root = Path(uri).expanduser().absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def url(self, key: str) -> str:
        return str(self._path(key))

    def _write_temp(self, final: Path, write: Callable[[object], None]) -> Path:
        tmp = final.parent / f"{_TMP_MARK}{final.name}.{uuid.uuid4().hex}"
        for attempt in range(3):
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                f = open(tmp, "wb")
                break
            except FileNotFoundError:  # folder removed by a concurrent delete_prefix
                if attempt == 2:
                    raise
        try:
            with f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def put_bytes(self, key: str, data: bytes) -> None:
        final = self._path(key)
        tmp = self._write_temp(final, lambda f: f.write(data))
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        final = self._path(key)

        def copy(f: object) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, 8 * MiB)

        tmp = self._write_temp(final, copy)
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        final = self._path(key)
        tmp = self._write_temp(final, lambda f: f.write(data))
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(final.parent)
        return True

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no such object: {path}")
        return path.read_bytes()

    # Local compare-and-swap: an exclusive flock on the object's folder around read, compare and
    # replace; every writer of a versioned object takes it. The version is the contents' sha256.
    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, hashlib.sha256(data).hexdigest()

    def put_if_match(self, key: str, data: bytes, version: str) -> str | None:
        final = self._path(key)
        with _folder_lock(final.parent):
            if not self._has_version(key, version):
                return None
            tmp = self._write_temp(final, lambda f: f.write(data))
            os.replace(tmp, final)
        _fsync_dir(final.parent)
        return hashlib.sha256(data).hexdigest()

    def delete_if_match(self, key: str, version: str) -> bool:
        final = self._path(key)
        with _folder_lock(final.parent):
            if not self._has_version(key, version):
                return False
            final.unlink()
        _fsync_dir(final.parent)
        return True

    def _has_version(self, key: str, version: str) -> bool:
        try:
            return self.get_versioned(key)[1] == version
        except FileNotFoundError:
            return False

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no such object: {path}")
        return open(path, "rb")

    def download(self, key: str, local_path: str | os.PathLike) -> None:
        src = self._path(key)
        if not src.is_file():
            raise FileNotFoundError(f"no such object: {src}")
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, local_path)

    def move(self, src: str, dst: str) -> None:
        source, target = self._path(src), self._path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            if not target.is_file():
                raise
            return
        _fsync_dir(target.parent)

    def publish_folder(self, src_prefix: str, dst_prefix: str) -> None:
        source, target = self._path(src_prefix.rstrip("/")), self._path(dst_prefix.rstrip("/"))
        if not source.is_dir():
            return  # published already, or nothing staged
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(source, target)  # atomic: readers see no folder, then the whole folder
        except FileNotFoundError:  # another caller published it meanwhile
            return
        except OSError:  # the target holds files (left by a version that moved file by file): merge
            for info in self.list(src_prefix):
                self.move(info.key, dst_prefix + info.key[len(src_prefix):])
            self.delete_prefix(src_prefix)
        _fsync_dir(target.parent)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        prefix = _check_prefix(prefix)
        # Walk only the deepest folder that can contain matches.
        start = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        found: list[ObjectInfo] = []
        for dirpath, _dirs, files in os.walk(start):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith(_TMP_MARK):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    try:
                        size = os.stat(os.path.join(dirpath, name)).st_size
                    except FileNotFoundError:  # deleted while listing
                        continue
                    found.append(ObjectInfo(key, size, None))
        yield from sorted(found, key=lambda info: info.key)

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        super().delete_prefix(prefix)
        # Remove the folders left empty that lie entirely within the prefix, and the temporary
        # files of writes cut short there (a process killed mid-write; list() hides them).
        top = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        for dirpath, _dirs, files in os.walk(top, topdown=False):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            if rel != "." and f"{rel}/".startswith(prefix):
                for name in files:
                    if name.startswith(_TMP_MARK):
                        Path(dirpath, name).unlink(missing_ok=True)
                try:
                    os.rmdir(dirpath)
                except OSError:  # not empty
                    pass

    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        return pafs.LocalFileSystem(), self.uri

    def check_writable(self) -> None:
        key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        created = [p for p in (self.root, *self.root.parents) if not p.exists()]  # deepest first
        try:
            self.put_bytes(key, b"probe")
            self.delete([key])
        except OSError as e:
            raise StorageError(f"cannot write to local folder {self.uri}: {e.strerror or e}") from None
        finally:  # leave no trace: the probe's folder and the folders it made
            for folder in (self.root / PROBE_PREFIX, *created):
                try:
                    folder.rmdir()
                except FileNotFoundError:
                    continue
                except OSError:  # not empty: in use
                    break


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on a folder, held for the block."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- S3

_client_lock = threading.Lock()
_clients: dict[tuple, object] = {}
# Settings that change which endpoint/identity a client talks to; a change makes a new client.
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_REGION",
    "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
)


def s3_client() -> Any:
    """The process's shared boto3 S3 client (thread-safe; rebuilt after fork or when the
    AWS environment changes). Endpoint, region and credentials come from the AWS chain."""
    import boto3
    import botocore.config
    import botocore.session

    key = (os.getpid(),) + tuple(os.environ.get(name) for name in _CLIENT_ENV)
    client = _clients.get(key)
    if client is None:
        with _client_lock:
            client = _clients.get(key)
            if client is None:
                core = botocore.session.get_session()
                config = botocore.config.Config(
                    retries=_retries(core),
                    connect_timeout=10,
                    read_timeout=60,
                    max_pool_connections=32,
                )
                client = boto3.session.Session(botocore_session=core).client("s3", config=config)
                _clients.clear()
                _clients[key] = client
    return client


def _retries(core: Any) -> dict[str, Any]:
    """botocore's retries as the AWS chain sets them (``AWS_RETRY_MODE``/``AWS_MAX_ATTEMPTS`` or
    the profile's ``retry_mode``/``max_attempts``, counting the first try), else adaptive mode,
    10 retries: a busy S3 endpoint answers SlowDown, and adaptive mode slows the whole client down."""
    mode = os.environ.get("AWS_RETRY_MODE") or core.get_scoped_config().get("retry_mode") or "adaptive"
    try:
        attempts = int(core.get_config_variable("max_attempts") or 11)
    except ValueError as e:
        raise StorageError(f"AWS_MAX_ATTEMPTS (or the profile's max_attempts) must be a whole number: {e}") from None
    return {"mode": mode, "total_max_attempts": attempts}


def _arrow_attempts() -> int:
    """Request attempts of pyarrow's S3 filesystem (manifests): the same as the boto3 client's."""
    import botocore.session

    return _retries(botocore.session.get_session())["total_max_attempts"]


def _error_code(e: Exception) -> str:
    response = getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _status(e: Exception) -> int:
    response = getattr(e, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _is_not_found(e: Exception) -> bool:
    return _error_code(e) in ("NoSuchKey", "404", "NotFound") or (
        _status(e) == 404 and _error_code(e) != "NoSuchBucket"
    )


def _transient(e: Exception) -> bool:
    """Worth retrying a whole upload: connection problems, 5xx, throttling."""
    import boto3.exceptions
    import botocore.exceptions

    if isinstance(e, (botocore.exceptions.ConnectionError, botocore.exceptions.ReadTimeoutError,
                      boto3.exceptions.S3UploadFailedError)):
        return "NoSuchBucket" not in str(e) and "AccessDenied" not in str(e)
    if isinstance(e, botocore.exceptions.ClientError):
        return _status(e) >= 500 or _error_code(e) in ("SlowDown", "Throttling", "RequestTimeout")
    return False


class _S3ConditionalWrites:
    """S3Storage's conditional requests: create-only writes (commit markers) and compare-and-swap
    on an object's ETag (the OUTPUT lease), and the probe that tells whether a store enforces them."""

    bucket: str
    uri: str
    client: Any
    _key: Callable[[str], str]
    exists: Callable[[str], bool]
    delete: Callable[[Iterable[str]], None]
    _raise_storage_error: Callable[..., None]
    _raise_read_error: Callable[..., NoReturn]

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Conditional write (``If-None-Match: *``). S3 answers 412 when the key exists and
        409 when a concurrent conditional write is in flight; then we look again.

        If botocore retries a PUT whose first attempt did land (response lost), the retry
        sees 412 and we report False: callers that must know who won should write a unique
        token and read the object back."""
        import botocore.exceptions

        full = self._key(key)
        for attempt in range(10):
            try:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
                return True
            except botocore.exceptions.ClientError as e:
                code = _error_code(e)
                if code == "PreconditionFailed" or _status(e) == 412:
                    return False
                if code == "ConditionalRequestConflict" or _status(e) == 409:
                    if self.exists(key):
                        return False
                    time.sleep(min(2.0, 0.05 * 2 ** attempt) * (0.5 + random.random()))
                    continue
                self._raise_storage_error(e, "writing to", key)
                raise
        raise StorageError(f"conditional write to {self.url(key)} kept conflicting")

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        return self._fetch(key)

    def put_if_match(self, key: str, data: bytes, version: str) -> str | None:
        response = self._if_match(lambda: self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data, IfMatch=version), key)
        return None if response is None else response["ETag"]

    def delete_if_match(self, key: str, version: str) -> bool:
        return self._if_match(lambda: self.client.delete_object(
            Bucket=self.bucket, Key=self._key(key), IfMatch=version), key) is not None

    def _if_match(self, request: Callable[[], Any], key: str) -> Any:
        """A conditional request's response; None when the object changed (412), is gone (404)
        or another conditional write is in flight (409: we lost that race too)."""
        import botocore.exceptions

        try:
            return request()
        except botocore.exceptions.ClientError as e:
            if _status(e) in (404, 409, 412) or _error_code(e) in ("PreconditionFailed", "NoSuchKey",
                                                                  "ConditionalRequestConflict"):
                return None
            self._raise_storage_error(e, "writing to", key)
            raise

    def supports_compare_and_swap(self) -> bool:
        """Whether the store refuses a PutObject whose ``If-Match`` names another ETag (a probe)."""
        stale = '"00000000000000000000000000000000"'
        return _probe_conditional(self, "if-match", "If-Match", f"the lease on {self.uri} needs",
                                  lambda key: self.put_if_match(key, b"second", stale) is None)

    def supports_create_only(self) -> bool:
        """Whether the store refuses a second ``If-None-Match: *`` write of a key (a probe)."""
        return _probe_create_only(self)


class S3Storage(_S3ConditionalWrites, Storage):
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

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_chunksize)

    def _raise_storage_error(self, e: Exception, action: str, key: str | None = None) -> None:
        """Re-raise bucket-level failures as StorageError (code only, never credentials)."""
        code = _error_code(e) or ("NoSuchBucket" if "NoSuchBucket" in str(e) else "")
        if not code and "AccessDenied" in str(e):
            code = "AccessDenied"
        where = self.url(key) if key else self.uri
        if code == "NoSuchBucket":
            raise StorageError(f"bucket '{self.bucket}' does not exist ({self.uri})") from None
        if code in ("AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId",
                    "SignatureDoesNotMatch", "ExpiredToken") or _status(e) == 403:
            raise StorageError(f"access denied {action} {where} ({code or 403})") from None

    def _upload(self, fn: Callable[[], T], key: str) -> T:
        for attempt in range(UPLOAD_ATTEMPTS):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below
                self._raise_storage_error(e, "writing to", key)
                if attempt + 1 == UPLOAD_ATTEMPTS or not _transient(e):
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
            if not _is_not_found(e):
                raise
            if self.exists(dst):
                return  # moved already
            raise FileNotFoundError(f"no such object: {self.url(src)}") from None

    def _raise_read_error(self, e: Exception, key: str) -> NoReturn:
        """Translate a failed read: FileNotFoundError, StorageError (bucket-level), or the error itself."""
        if _is_not_found(e):
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

        _check_prefix(prefix)
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
        return _s3_arrow_fs(self.bucket, self.prefix)

    def check_writable(self) -> None:
        key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=b"probe")
            self.delete([key])
        except Exception as e:  # noqa: BLE001 - translated to a one-line reason
            self._raise_storage_error(e, "writing to", None)
            code = _error_code(e) or type(e).__name__
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


def _s3_arrow_fs(bucket: str, prefix: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's S3 filesystem for a bucket, from the same AWS settings as the boto3 client."""
    kwargs: dict[str, object] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme:
            kwargs["scheme"] = parsed.scheme
            kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        else:
            kwargs["endpoint_override"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and not endpoint:
        try:
            region = pafs.resolve_s3_region(bucket)
        except OSError:
            region = None
    if region:
        kwargs["region"] = region
    root = f"{bucket}/{prefix}" if prefix else bucket
    retries = pafs.AwsStandardS3RetryStrategy(max_attempts=_arrow_attempts())
    return pafs.S3FileSystem(retry_strategy=retries, **kwargs), root


def _probe_create_only(storage: S3Storage) -> bool:
    """Whether the store refuses a second ``If-None-Match: *`` write of one key (412, or 409
    while the first is in flight)."""
    # the first put_if_absent is False only when a lost answer was retried: created all the same
    return _probe_conditional(storage, "create-only", "If-None-Match: *", f"commits to {storage.uri} need",
                              lambda key: not storage.put_if_absent(key, b"second"))


def _probe_conditional(storage: S3Storage, name: str, header: str, needed_by: str,
                       refused: Callable[[str], bool]) -> bool:
    """Create a scratch key under _probe/, then whether `refused(key)` (a second, conditional
    write the store must turn down); the key is deleted after. A store that rejects the header
    outright is a StorageError naming it and what needs it."""
    import botocore.exceptions

    key = f"{PROBE_PREFIX}{uuid.uuid4().hex}-{name}"
    try:
        storage.put_if_absent(key, b"first")
        return refused(key)
    except botocore.exceptions.ClientError as e:
        code = _error_code(e) or str(_status(e))
        raise StorageError(f"{_endpoint(storage)} rejects conditional writes (PutObject with {header}, {code}), "
                           f"which {needed_by}") from None
    finally:
        storage.delete([key])


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
