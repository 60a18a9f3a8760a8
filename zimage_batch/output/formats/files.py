"""``--format files``: ``images/<shard>/<key>.<ext>``, one object per image (and ``<key>.mask.png``
beside an edited image whose mask the job keeps), uploaded as samples arrive. The dataset card
points `load_dataset(OUTPUT)` at the metadata; the images are read by their paths.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from zimage_batch.output import layout
from zimage_batch.output.encoding import PNG, Encoding
from zimage_batch.output.features import yaml_features
from zimage_batch.output.formats.base import READ_THREADS, CardInput, OutputFormat
from zimage_batch.output.shard_writer import ShardWriter
from zimage_batch.storage import Storage
from zimage_batch.threads import background_pool


class FilesWriter(ShardWriter):
    """``images/<shard>/<key>.<ext>``, uploaded on a small thread pool while the caller goes on.

    At most ``max_pending`` uploads are queued; ``add`` blocks beyond that, which bounds memory.
    The first failed upload is raised by the next ``add`` or by ``close``.
    """

    output_format = "files"

    def __init__(self, storage: Storage, shard: str, encoding: Encoding = PNG, *,
                 upload_threads: int = 8, max_pending: int = 32) -> None:
        super().__init__(storage, shard, encoding)
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


def read(storage: Storage, locations: Sequence[str], column: str = "image") -> dict[str, bytes]:
    """Each image is its own object (`column` does not apply)."""
    def one(location: str) -> bytes | None:
        try:
            return storage.get_bytes(location)
        except FileNotFoundError:
            return None

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        return {loc: data for loc, data in zip(locations, pool.map(one, locations)) if data is not None}


def mask_location(image: str) -> str:
    """``images/<shard>/<key>.mask.png`` beside ``images/<shard>/<key>.<ext>``."""
    return image.rsplit(".", 1)[0] + layout.MASK_SUFFIX


def features(card: CardInput) -> list[dict[str, Any]]:
    """`load_dataset(OUTPUT)` yields the metadata rows."""
    return yaml_features(card.metadata)


def loading(ext: str) -> list[str]:
    return ['ds = load_dataset("path/to/this/folder", split="train")  # the metadata; images under images/']


FORMAT = OutputFormat(
    name="files",
    folder=layout.IMAGES,
    shard_key=layout.images_prefix,
    writer=FilesWriter,
    writer_options=("upload_threads", "max_pending"),
    read=read,
    mask_location=mask_location,
    data_files=f"{layout.METADATA}*.parquet",
    features=features,
    loading=loading,
    stages_locally=False,
)
