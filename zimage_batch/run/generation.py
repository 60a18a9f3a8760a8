"""One shard's rows through the model: batches, generation on the model thread, and each
image encoded and stored beside the batches that follow.

The model runs one batch at a time on the worker's model thread; encoding (PNG/JPEG/WebP) and
handing images to the writer run on background threads, so the model does not wait for them,
with at most STORE_BACKLOG_BATCHES batches waiting (bounded memory). Edit rows load their
sources on a thread pool a window ahead of the batches that need them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import numpy as np
import torch

from zimage_batch.curate.judge import FILTER, KEEP, REDRAW, ShardJudge
from zimage_batch.curate.scorers import Scored
from zimage_batch.generate.engine import Engine
from zimage_batch.generate.requests import release_pixels
from zimage_batch.generate.segmenter import Segmenter
from zimage_batch.inputs import images
from zimage_batch.inputs.mask_spec import MaskJob
from zimage_batch.output.encoding import Encoding
from zimage_batch.output.keys import sample_key
from zimage_batch.output.writers import ShardWriter
from zimage_batch.run import metrics
from zimage_batch.run.batching import BatchSizer
from zimage_batch.run.heartbeat import ProgressCounter
from zimage_batch.run.loading import EditRow, complete_words, load_row
from zimage_batch.run.rows import Request, error_outcome, row_record
from zimage_batch.run.settings import WorkerSettings

log = logging.getLogger(__name__)

PREFETCH_BATCHES = 4  # edit rows are loaded (and grouped into batches) this many batches at a time
STORE_BACKLOG_BATCHES = 2  # encoded images waiting for storage, in batches (bounds memory)
# Failures that belong to the rows of a batch (bad values, one row too large for the device);
# a batch that fails with one of these is retried row by row and the failing rows become errors.
ROW_ERRORS = (ValueError, TypeError, torch.OutOfMemoryError)


class RowFailure(Exception):
    """Why one row could not be generated (the message of the original error)."""


@dataclass(frozen=True)
class WorkerModel:
    """A worker's loaded model and the threads around it, shared by the shards it runs."""

    engine: Engine
    settings: WorkerSettings
    batch_size: int
    model_thread: ThreadPoolExecutor  # every model call, one at a time
    encoder: ThreadPoolExecutor  # image encoding
    storer: ThreadPoolExecutor  # hands images to the writer, in row order
    sources: ThreadPoolExecutor | None  # edit manifests: source fetches and decodes
    passthrough_names: frozenset[str]  # manifest columns copied into each sample's JSON
    worker_id: str
    batch_sizes: BatchSizer | None = None  # each batch key's size from its shape (else batch_size)
    progress: ProgressCounter | None = None  # ticked by every batch, for the worker's heartbeat
    masks: MaskJob | None = None  # an edit job that keeps masks: the rows' mask defaults
    segmenter: Segmenter | None = None  # masks from words: CLIPSeg, run on the model thread


class ShardGeneration:
    """Generates and stores the rows of one shard attempt; `run()` returns each row's outcome."""

    def __init__(self, model: WorkerModel, rows: list[dict[str, Any]], requests: list[Request], writer: ShardWriter,
                 base: str, judge: ShardJudge | None = None, *, shard: str | None = None,
                 before_batch: Callable[[], None] | None = None) -> None:
        """`base` is the folder that relative source URIs of edit rows start from; `judge` scores
        each drawn image and keeps, redraws or filters it (a curated job); `shard` names the
        shard in the worker's heartbeat; `before_batch` runs before each batch (it may raise to
        end the attempt)."""
        self.engine, self.settings, self.batch_size = model.engine, model.settings, model.batch_size
        self.encoding = Encoding.of_job(self.settings.job)
        self.model_thread, self.encoder, self.storer, self.sources = (
            model.model_thread, model.encoder, model.storer, model.sources)
        self.passthrough_names, self.worker_id = model.passthrough_names, model.worker_id
        self.batch_sizes, self.progress, self.shard = model.batch_sizes, model.progress, shard
        self.rows, self.requests, self.writer, self.base = rows, requests, writer, base
        self.judge = judge
        self.before_batch = before_batch
        self.outcomes: list[dict[str, Any] | None] = [None] * len(rows)
        self.lineage: dict[int, dict[str, Any]] = {}  # edit rows: where the source came from
        self.masks, self.segmenter = model.masks, model.segmenter
        self.mask_files: dict[int, bytes] = {}  # inpaint rows of a job that keeps masks: the mask as used
        self.stored: list[tuple[int, Future]] = []  # (row, its store task), in submission order
        self.confirmed = 0  # stored[:confirmed] are done and their outcomes recorded
        self.busy_s = 0.0  # model time of this shard's own batches (not of a shard beside it)

    # ------------------------------------------------------------------ the loop
    def run(self) -> list[dict[str, Any]]:
        """Generate batch by batch and store every image; each row's outcome, in row order."""
        encoded_ahead = self.engine.low_vram and self._encode_ahead()
        try:
            batches = self._batches()
            while batches is not None:  # one pass per try: the images to redraw make the next one
                redraw = [i for batch in batches for i in self._draw(batch)]
                for i in redraw:
                    self.requests[i] = self.judge.redraw(i, self.requests[i])  # type: ignore[union-attr]
                batches = self._cut(redraw) if redraw else None
            self._confirm(0)
        except BaseException:
            # The caller aborts the writer next: no store of this attempt may still be writing.
            outstanding = [task for _, task in self.stored[self.confirmed :]]
            for task in outstanding:
                task.cancel()
            wait(outstanding)
            raise
        finally:
            if encoded_ahead:
                self._release_prompts()
        for i, extra in self.lineage.items():
            self.outcomes[i] = {**self.outcomes[i], **extra}
        return self.outcomes  # type: ignore[return-value]

    def _draw(self, batch: list[int]) -> list[int]:
        """Draw one batch, store its images (a curated job: those kept) and return the rows to redraw."""
        if self.before_batch is not None:
            self.before_batch()
        self._confirm(STORE_BACKLOG_BATCHES * max(self.batch_size, len(batch)))
        started = time.perf_counter()
        pixels = self._generate([self.requests[i] for i in batch])
        scored = self._score(batch, pixels) if self.judge else {}
        duration_ms = (time.perf_counter() - started) * 1000 / len(batch)
        metrics.batch_done(self.worker_id, len(batch), duration_ms * len(batch) / 1000)
        redraw = []
        for i, image in zip(batch, pixels):
            verdict = self.judge.decide(i, scored[i]) if i in scored else KEEP  # type: ignore[union-attr]
            if isinstance(image, BaseException):
                self.outcomes[i] = error_outcome(f"generation failed: {image}", duration_ms)
            elif verdict == REDRAW:
                redraw.append(i)
            elif verdict == FILTER:
                self.outcomes[i] = self.judge.filtered_outcome(i, duration_ms)  # type: ignore[union-attr]
            else:
                encoded = self.encoder.submit(self._encode, image)
                self.stored.append((i, self.storer.submit(self._store, i, encoded, duration_ms)))
        return redraw

    def _score(self, batch: list[int], pixels: list[np.ndarray | BaseException]) -> dict[int, Scored]:
        """The drawn images of a batch scored on the model thread, in one batch (model time)."""
        drawn = [(i, image) for i, image in zip(batch, pixels) if not isinstance(image, BaseException)]
        if not drawn:
            return {}
        prompts = [self.requests[i].prompt for i, _ in drawn]
        started = time.perf_counter()
        scored = self.model_thread.submit(self.judge.scorers.score, [p for _, p in drawn], prompts).result()  # type: ignore[union-attr]
        self.busy_s += time.perf_counter() - started
        return {i: s for (i, _), s in zip(drawn, scored)}

    def _confirm(self, backlog: int) -> None:
        """Record finished stores in order (a failed store raises here), waiting while more
        than `backlog` are outstanding."""
        while self.confirmed < len(self.stored) and (
            len(self.stored) - self.confirmed > backlog or self.stored[self.confirmed][1].done()
        ):
            i, future = self.stored[self.confirmed]
            self.outcomes[i] = future.result()
            self.confirmed += 1

    # ------------------------------------------------------------------ batches
    def _batches(self) -> Iterator[list[int]]:
        """Row indices, batch by batch, rows sharing a batch key together. Edit rows are loaded
        a window at a time while the previous window generates; rows whose source cannot be
        used get their error outcome here."""
        if self.sources is None:
            yield from self._cut(range(len(self.requests)))
            return
        windows = images.prefetch(
            self.sources, range(len(self.rows)), self._load_edit, PREFETCH_BATCHES * self.batch_size, first=self.batch_size
        )
        for window in windows:
            ready = []
            for i, loaded in self._segment(window):
                self.lineage[i] = loaded.lineage
                if loaded.error:
                    self.outcomes[i] = error_outcome(loaded.error)
                else:
                    self.requests[i] = loaded.request
                    ready.append(i)
                    if loaded.mask_png is not None:
                        self.mask_files[i] = loaded.mask_png
            for batch in self._cut(ready):
                yield batch
                for i in batch:  # the pixels of a drawn batch's sources are no longer needed
                    release_pixels(self.requests[i])

    def _segment(self, window: list[tuple[int, EditRow]]) -> list[tuple[int, EditRow]]:
        """The window's words rows get their masks: CLIPSeg on the model thread, the window at once."""
        waiting = [k for k, (_, loaded) in enumerate(window) if loaded.segment is not None]
        if not waiting:
            return window
        sources = [window[k][1].segment for k in waiting]
        found = self.model_thread.submit(self.segmenter.probabilities, [image for image, _ in sources],
                                         [spec.prompt for _, spec in sources]).result()
        window = list(window)
        for k, probability in zip(waiting, found):
            window[k] = (window[k][0], complete_words(window[k][1], probability))
        return window

    def _cut(self, indices: Sequence[int]) -> Iterator[list[int]]:
        return cut_batches(self.requests, indices, self._size_of)

    def _size_of(self, request: Request) -> int:
        if self.batch_sizes is None:
            return self.batch_size
        return self.batch_sizes.size(request.width, request.height)

    def _load_edit(self, i: int) -> EditRow:
        """A row's source and mask, or its ControlNet condition, fetched and decoded (on the
        source pool, ahead of the GPU)."""
        limit = self.settings.job.max_source_pixels or images.DEFAULT_MAX_PIXELS
        canny = self.settings.control.canny if self.settings.control else (0.0, 0.0)
        return load_row(self.rows[i], self.requests[i], self.base, self.engine.variant, limit, canny, self.masks)

    # ------------------------------------------------------------------ the model
    def _generate(self, batch: list[Request]) -> list[np.ndarray | BaseException]:
        """One batch on the model thread; if it fails, retry row by row so one bad row fails alone."""
        try:
            return self.model_thread.submit(self._timed_generate, batch).result()
        except ROW_ERRORS as exc:
            if len(batch) == 1:
                # Only the message: the exception's traceback holds the failed call's frames,
                # and with them its device memory, which the rows after it need.
                return [RowFailure(str(exc))]
            log.warning("batch failed (%s); retrying its rows one by one", exc)
        # Anything else (a CUDA fault, a crashed kernel) is the worker's problem, not the rows':
        # it fails the shard attempt, which the driver retries on a fresh worker.
        results: list[np.ndarray | BaseException] = []
        for request in batch:
            results.extend(self._generate([request]))
        return results

    def _timed_generate(self, batch: list[Request]) -> list[np.ndarray]:
        """On the model thread: one batch, its time added to this shard's model time (a shard
        beside it waits for the model thread meanwhile, and its time is not counted here)."""
        started = time.perf_counter()
        try:
            return self.engine.generate(batch, len(batch))
        finally:
            elapsed = time.perf_counter() - started
            self.busy_s += elapsed
            if self.progress is not None:
                self.progress.tick(self.shard, elapsed)

    def _encode_ahead(self) -> bool:
        """low_vram: the text encoder's one turn on the device for this shard. If it fails, each
        batch encodes its own prompts instead (slower, and a bad row still fails alone)."""
        try:
            self.model_thread.submit(self.engine.encode_ahead, self.requests, self.batch_size).result()
            return True
        except ROW_ERRORS as exc:
            log.warning("encoding the shard's prompts ahead failed (%s); encoding batch by batch", exc)
            return False

    def _release_prompts(self) -> None:
        try:
            self.model_thread.submit(self.engine.release_prompts, self.requests).result()
        except Exception:  # noqa: BLE001 - never hide the shard's own outcome or error
            log.exception("releasing the shard's cached prompts failed")

    # ------------------------------------------------------------------ encode and store
    def _encode(self, image: np.ndarray) -> tuple[bytes, str]:
        data = self.encoding.encode(image)
        return data, hashlib.sha256(data).hexdigest()

    def _store(self, i: int, encoded: Future, duration_ms: float) -> dict[str, Any]:
        data, digest = encoded.result()
        row = self.rows[i]
        meta = row_record(row, self.requests[i], self.settings) | {"sha256": digest, "duration_ms": duration_ms}
        meta |= self.lineage.get(i) or {}
        curated = self.judge.extra(i) if self.judge else {}
        meta |= curated
        meta |= {k: v for k, v in row.items() if k in self.passthrough_names}
        location = self.writer.add(sample_key(row["id"], row.get("image_index")), data, meta,
                                   mask=self.mask_files.pop(i, None))
        return {"status": "ok", "error": None, "image": location, "sha256": digest, "duration_ms": duration_ms,
                **curated}


def cut_batches(requests: Sequence[Request], indices: Sequence[int], size_of: Callable[[Request], int]) -> Iterator[list[int]]:
    """Batches of one batch key each (so a batch runs as one, and its per-row duration is that
    of its own rows), each as large as `size_of` its key's first request allows."""
    key = lambda i: requests[i].batch_key()  # noqa: E731
    for _, same in groupby(sorted(indices, key=key), key=key):
        same = list(same)
        size = size_of(requests[same[0]])
        for b in range(0, len(same), size):
            yield same[b : b + size]
