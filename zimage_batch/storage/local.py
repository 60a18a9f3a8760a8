"""A local folder as a `Storage`: writes go to a temporary file in the same folder, are fsynced,
then renamed (or hard-linked, for create-only writes) into place; compare-and-swap holds an
exclusive flock on the object's folder."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

from zimage_batch.storage.base import PROBE_PREFIX, MiB, ObjectInfo, Storage, StorageError, check_key, check_prefix

#: Local temporary files start with this; list() hides them.
TMP_MARK = ".~zb-tmp-"


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

    def child(self, prefix: str) -> LocalStorage:
        return LocalStorage(self.url(prefix.rstrip("/")))

    def _write_temp(self, final: Path, write: Callable[[object], None]) -> Path:
        tmp = final.parent / f"{TMP_MARK}{final.name}.{uuid.uuid4().hex}"
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
        fsync_dir(final.parent)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        final = self._path(key)

        def copy(f: object) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, 8 * MiB)

        tmp = self._write_temp(final, copy)
        os.replace(tmp, final)
        fsync_dir(final.parent)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        final = self._path(key)
        tmp = self._write_temp(final, lambda f: f.write(data))
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(final.parent)
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
        fsync_dir(final.parent)
        return hashlib.sha256(data).hexdigest()

    def delete_if_match(self, key: str, version: str) -> bool:
        final = self._path(key)
        with _folder_lock(final.parent):
            if not self._has_version(key, version):
                return False
            final.unlink()
        fsync_dir(final.parent)
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
        fsync_dir(target.parent)

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
        fsync_dir(target.parent)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        prefix = check_prefix(prefix)
        # Walk only the deepest folder that can contain matches.
        start = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        found: list[ObjectInfo] = []
        for dirpath, _dirs, files in os.walk(start):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith(TMP_MARK):
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
                    if name.startswith(TMP_MARK):
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


def fsync_dir(path: Path) -> None:
    """Make a rename or link in `path` durable (best effort: some filesystems refuse it)."""
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

