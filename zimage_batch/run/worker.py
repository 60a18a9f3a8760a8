"""A worker: one loaded model that turns a shard into images, metadata and a commit marker.

`ShardRunner` is plain Python (testable without Ray); the driver runs it as a threaded Ray
actor so that one shard's reading, encoding, uploads and commit overlap the next shard's
generation, while the model itself runs one batch at a time on a dedicated thread.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import os
import platform
import posixpath
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from itertools import groupby
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from zimage_batch.generate.edit import EditEngine
from zimage_batch.generate.engine import Engine, default_device, low_vram_needed
from zimage_batch.generate.requests import EditRequest, GenerationRequest, infer_mode
from zimage_batch.inputs import images
from zimage_batch.inputs.manifest import (
    EDIT_METADATA_COLUMNS,
    KNOWN_COLUMNS,
    METADATA_COLUMNS,
    derive_seed,
    open_manifest,
    rows_digest,
    rows_of_variant,
)
from zimage_batch.model.sources import resolve_model, source_for_variant
from zimage_batch.output.keys import safe_key
from zimage_batch.output.ledger import Ledger, commit_key
from zimage_batch.output.writers import encode_image, make_writer
from zimage_batch.run import metrics
from zimage_batch.run.plan import Shard
from zimage_batch.run.threads import background_pool
from zimage_batch.storage import open_storage

log = logging.getLogger(__name__)

SOURCE_THREADS = 16  # source fetches and decodes in flight per worker
PREFETCH_BATCHES = 4  # edit rows are loaded (and grouped into batches) this many batches at a time


class RowFailure(Exception):
    """Why one row could not be generated (the message of the original error)."""


STORE_BACKLOG_BATCHES = 2  # encoded images waiting for storage, in batches (bounds memory)
# Failures that belong to the rows of a batch (bad values, one row too large for the device);
# a batch that fails with one of these is retried row by row and the failing rows become errors.
ROW_ERRORS = (ValueError, TypeError, torch.OutOfMemoryError)


def error_outcome(reason: str, duration_ms: float = 0.0) -> dict[str, Any]:
    """A row's outcome when it has no image."""
    return {"status": "error", "error": reason, "image": None, "sha256": None, "duration_ms": duration_ms}


def metadata_key(shard: str) -> str:
    return f"metadata/{shard}.parquet"


class ShardRunner:
    """Runs shards of one job on one loaded model."""

    def __init__(self, job: dict[str, Any], variant: str, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.job = job
        self.variant = variant
        self.model = source_for_variant(job["model"], job.get("models") or {}, variant, job["variant"])
        self.defaults = job["defaults"]
        # Resolved here, on the worker's node: a hub or S3 model is fetched into this node's cache.
        model_path = resolve_model(self.model, variant).path
        device = job.get("device") or default_device()
        low_vram = job.get("low_vram", "auto")
        self.manifest = open_manifest(job["manifest"])
        self.edit = self.manifest.kind == "edit"  # the edit path draws edit requests too
        self.engine = (EditEngine if self.edit else Engine)(
            model_path,
            variant,
            device=device,
            attention_backend=job.get("attention_backend"),
            compile=bool(job.get("compile")),
            low_vram=low_vram == "on" or (low_vram == "auto" and low_vram_needed(device)),
        )
        self.batch_size = job.get("batch_size") or default_batch_size(
            self.defaults["width"], self.defaults["height"], device, self.engine.low_vram
        )
        # Every model call runs on this one thread: shards run on the actor's threads side by
        # side, and CPU thread pools (OpenMP) keep one team per calling thread, so calls from
        # several threads would leave idle teams spinning against the busy one.
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.model_thread.submit(self._warm_up).result()
        # The loaded libraries and model (~300k objects) live as long as the worker: keep them out
        # of every later garbage collection, whose full passes would otherwise stall all threads
        # (the model's too) for 0.1-0.3 s each (measured on the tiny model; more with a real one).
        gc.collect()
        gc.freeze()
        self.storage = open_storage(job["output"])
        self.ledger = Ledger(self.storage)
        self.files = {f.name: f for f in self.manifest.files}
        self.encoder = background_pool(2, "encode")
        # Images are handed to the writer on one thread, in row order (tar members and
        # metadata stay deterministic), while the model thread goes on to the next batch.
        self.storer = background_pool(1, "store")
        self.sources = background_pool(SOURCE_THREADS, "source") if self.edit else None
        self.first_shard_started: float | None = None
        self.worker_id = f"{platform.node()}:{os.getpid()}"

    def _warm_up(self) -> None:
        """One short generation at the default size, so first-call costs (kernel selection,
        lazy initialisation, compilation) do not land on the first shard."""
        d = self.defaults
        self.engine.generate([GenerationRequest("warm-up", 0, d["width"], d["height"], 2, 0.0)], batch_size=1)
        self.engine.busy_seconds = 0.0

    # ------------------------------------------------------------------ one shard
    def run_shard(self, shard: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
        """Generate, store and commit one shard; returns its commit marker (or a skip note)."""
        shard_obj = Shard(**shard)
        if self._already_committed(shard_obj):
            return {"shard": shard_obj.name, "skipped": True}
        _inject_crash(shard_obj.name)
        started = time.time()
        self.first_shard_started = self.first_shard_started or started
        table = self.manifest.read_rows(self.files[shard_obj.file], shard_obj.start, shard_obj.end)
        if shard_obj.variant is not None:
            table = rows_of_variant(table, shard_obj.variant, self.job["variant"])
        rows = table.to_pylist()
        requests = [self._request(row) for row in rows]
        base = posixpath.dirname(self.manifest.display_name(self.files[shard_obj.file]))  # for relative sources
        busy_before = self.engine.busy_seconds
        writer = make_writer(
            self.job["format"], self.storage, shard_obj.name, self.job["image_format"], self.job["quality"]
        )
        try:
            outcomes = self._generate_and_store(rows, requests, writer, base)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if self._already_committed(shard_obj):
            # another attempt of this shard won while we worked: leave its objects alone
            return {"shard": shard_obj.name, "skipped": True}
        writer.remove_strays()
        self._write_metadata(shard_obj, table, rows, requests, outcomes)
        ok = sum(1 for o in outcomes if o["status"] == "ok")
        marker = {
            "shard": shard_obj.name,
            "file": shard_obj.file,
            "start": shard_obj.start,
            "end": shard_obj.end,
            "variant": shard_obj.variant,
            "rows": len(rows),
            "ok": ok,
            "error": len(rows) - ok,
            "errors": [o["error"] for o in outcomes if o["error"]][:5],
            "digest": rows_digest(table),
            "fingerprint": self.job["fingerprint"],
            "format": self.job["format"],
            "attempt": attempt,
            "worker": self.worker_id,
            "started": started,
            "finished": time.time(),
            "busy_s": self.engine.busy_seconds - busy_before,
        }
        marker["committed"] = self.ledger.commit(shard_obj.name, marker)
        if marker["committed"]:
            metrics.rows_done(self.worker_id, ok, len(rows) - ok)
        return marker

    def _already_committed(self, shard: Shard) -> bool:
        """True if `shard` is committed; a marker for another row range under its name is refused."""
        try:
            marker = json.loads(self.storage.get_bytes(commit_key(shard.name)))
        except FileNotFoundError:
            return False
        if (marker.get("start"), marker.get("end")) != (shard.start, shard.end):
            raise RuntimeError(
                f"shard {shard.name} was committed for rows {marker.get('start')}..{marker.get('end')}, "
                f"not {shard.start}..{shard.end}: another run is writing this OUTPUT"
            )
        return True

    def _request(self, row: dict[str, Any]) -> GenerationRequest:
        d = self.defaults

        def value(name: str) -> Any:
            v = row.get(name)
            return d[name] if v is None else v

        seed = row.get("seed")
        common = dict(
            prompt=row["prompt"],
            seed=derive_seed(self.job["seed"], row["id"]) if seed is None else int(seed),
            num_inference_steps=int(value("num_inference_steps")),
            guidance_scale=float(value("guidance_scale")),
            negative_prompt=value("negative_prompt"),
            cfg_truncation=float(value("cfg_truncation")),
            cfg_normalization=float(value("cfg_normalization")),
        )
        if self.edit:  # sizes left empty follow the source, known once it is loaded
            mode = infer_mode(row.get("mode"), bool(row.get("mask")), self.engine.variant)
            width, height = row.get("width") or self.job.get("width"), row.get("height") or self.job.get("height")
            return EditRequest(width=width, height=height, mode=mode, strength=float(value("strength")), **common)
        return GenerationRequest(width=int(value("width")), height=int(value("height")), **common)

    def _load_edit(self, row: dict[str, Any], template: EditRequest, base: str) -> images.EditRow:
        """A row's source and mask, fetched and decoded (on the source pool, ahead of the GPU)."""
        source = images.resolve_uri(row["source"], base)
        mask = images.resolve_uri(row["mask"], base) if row.get("mask") else None
        limit = self.job.get("max_source_pixels") or images.DEFAULT_MAX_PIXELS
        return images.load_edit_row(template, source, mask, self.engine.variant, limit)

    def _batches(self, rows, requests, outcomes, lineage, base: str):
        """Row indices, batch by batch, rows sharing a batch key together. Edit rows are loaded
        a window at a time while the previous window generates; rows whose source cannot be
        used get their error outcome here, and their pixels are dropped once generated."""
        if not self.edit:
            yield from self._cut(range(len(requests)), requests)
            return
        load = lambda i: self._load_edit(rows[i], requests[i], base)  # noqa: E731
        windows = images.prefetch(
            self.sources, range(len(rows)), load, PREFETCH_BATCHES * self.batch_size, first=self.batch_size
        )
        for window in windows:
            ready = []
            for i, loaded in window:
                lineage[i] = loaded.lineage
                if loaded.error:
                    outcomes[i] = error_outcome(loaded.error)
                else:
                    requests[i] = loaded.request
                    ready.append(i)
            for batch in self._cut(ready, requests):
                yield batch
                for i in batch:
                    requests[i].image = requests[i].mask = None

    def _cut(self, indices, requests) -> Iterator[list[int]]:
        """Batches of at most batch_size rows, each of one batch key (so a batch runs as one, and
        its per-row duration is that of its own rows)."""
        order = sorted(indices, key=lambda i: requests[i].batch_key())
        for _, same in groupby(order, key=lambda i: requests[i].batch_key()):
            same = list(same)
            for b in range(0, len(same), self.batch_size):
                yield same[b : b + self.batch_size]

    def _generate_and_store(self, rows, requests, writer, base: str = "") -> list[dict[str, Any]]:
        """Generate batch by batch; each image is encoded and stored beside the batches that
        follow, with at most STORE_BACKLOG_BATCHES batches waiting for storage."""
        outcomes: list[dict[str, Any] | None] = [None] * len(rows)
        stored: list[tuple[int, Future]] = []  # (row, its store task), in submission order
        confirmed = 0  # stored[:confirmed] are done and their outcomes recorded
        lineage: dict[int, dict[str, Any]] = {}  # edit rows: where the source came from

        def confirm(backlog: int) -> None:
            """Record finished stores in order (a failed store raises here), waiting while more
            than `backlog` are outstanding."""
            nonlocal confirmed
            while confirmed < len(stored) and (len(stored) - confirmed > backlog or stored[confirmed][1].done()):
                i, future = stored[confirmed]
                outcomes[i] = future.result()
                confirmed += 1

        encoded_ahead = self.engine.low_vram and self._encode_ahead(requests)
        try:
            for batch in self._batches(rows, requests, outcomes, lineage, base):
                confirm(STORE_BACKLOG_BATCHES * self.batch_size)
                started = time.perf_counter()
                images = self._generate([requests[i] for i in batch])
                duration_ms = (time.perf_counter() - started) * 1000 / len(batch)
                metrics.batch_done(self.worker_id, len(batch), duration_ms * len(batch) / 1000)
                for i, image in zip(batch, images):
                    if isinstance(image, BaseException):
                        outcomes[i] = error_outcome(f"generation failed: {image}", duration_ms)
                    else:
                        encoded = self.encoder.submit(self._encode, image)
                        task = self.storer.submit(self._store, writer, rows[i], requests[i], encoded, duration_ms, lineage.get(i))
                        stored.append((i, task))
            confirm(0)
        except BaseException:
            # The caller aborts the writer next: no store of this attempt may still be writing.
            outstanding = [task for _, task in stored[confirmed:]]
            for task in outstanding:
                task.cancel()
            wait(outstanding)
            raise
        finally:
            if encoded_ahead:
                self._release_prompts(requests)
        for i, extra in lineage.items():
            outcomes[i] = {**outcomes[i], **extra}
        return outcomes  # type: ignore[return-value]

    def _encode_ahead(self, requests) -> bool:
        """low_vram: the text encoder's one turn on the device for this shard. If it fails, each
        batch encodes its own prompts instead (slower, and a bad row still fails alone)."""
        try:
            self.model_thread.submit(self.engine.encode_ahead, requests, self.batch_size).result()
            return True
        except ROW_ERRORS as exc:
            log.warning("encoding the shard's prompts ahead failed (%s); encoding batch by batch", exc)
            return False

    def _release_prompts(self, requests) -> None:
        try:
            self.model_thread.submit(self.engine.release_prompts, requests).result()
        except Exception:  # noqa: BLE001 - never hide the shard's own outcome or error
            log.exception("releasing the shard's cached prompts failed")

    def _generate(self, batch: list[GenerationRequest]) -> list[np.ndarray | BaseException]:
        """One batch on the model thread; if it fails, retry row by row so one bad row fails alone."""
        try:
            return self.model_thread.submit(self.engine.generate, batch, len(batch)).result()
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

    def _encode(self, image: np.ndarray) -> tuple[bytes, str]:
        data = encode_image(image, self.job["image_format"], self.job["quality"])
        return data, hashlib.sha256(data).hexdigest()

    def _store(self, writer, row, request, future: Future, duration_ms: float, lineage: dict | None = None) -> dict[str, Any]:
        data, digest = future.result()
        key = safe_key(row["id"])
        meta = self._row_record(row, request) | {"sha256": digest, "duration_ms": duration_ms}
        meta |= lineage or {}
        meta |= {k: v for k, v in row.items() if k not in KNOWN_COLUMNS}
        location = writer.add(key, data, meta)
        return {"status": "ok", "error": None, "image": location, "sha256": digest, "duration_ms": duration_ms}

    def _row_record(self, row: dict[str, Any], request) -> dict[str, Any]:
        """What made a row's image: the metadata's settings columns, and each sample's JSON."""
        return {
            "id": row["id"],
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "seed": request.seed,
            "width": request.width,
            "height": request.height,
            "num_inference_steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale,
            "cfg_truncation": request.cfg_truncation,
            "cfg_normalization": request.cfg_normalization,
            "variant": self.variant,
            "model": self.model,
        }

    def _write_metadata(self, shard: Shard, table: pa.Table, rows, requests, outcomes) -> None:
        schema = METADATA_COLUMNS | (EDIT_METADATA_COLUMNS if self.edit else {})
        columns: dict[str, list[Any]] = {name: [] for name in schema}
        for row, request, outcome in zip(rows, requests, outcomes):
            values = self._row_record(row, request) | outcome
            for name in schema:
                columns[name].append(values.get(name))
        metadata = pa.table({name: pa.array(columns[name], type=t) for name, t in schema.items()})
        for field in self.manifest.passthrough:  # the same columns and types in every shard
            if field.name in table.column_names:
                values = table.column(field.name).cast(field.type)
            else:
                values = pa.nulls(table.num_rows, field.type)
            metadata = metadata.append_column(field, values)
        buffer = io.BytesIO()
        pq.write_table(metadata, buffer)
        self.storage.put_bytes(metadata_key(shard.name), buffer.getvalue())

    # ------------------------------------------------------------------ figures
    def stats(self) -> dict[str, Any]:
        """Device busy fraction: time generating over wall time since this worker's first shard."""
        since = self.first_shard_started or time.time()
        wall = time.time() - since
        return {"worker": self.worker_id, "busy_s": self.engine.busy_seconds, "wall_s": wall,
                "busy_fraction": min(1.0, self.engine.busy_seconds / wall) if wall else 0.0}


CRASH_ENV = "ZIMAGE_BATCH_FAULT_CRASH_SHARDS"


def _inject_crash(shard: str) -> None:
    """Fault injection for drills and tests: kill this worker process when it starts a shard
    whose name contains one of the comma-separated strings in $ZIMAGE_BATCH_FAULT_CRASH_SHARDS."""
    patterns = [p for p in os.environ.get(CRASH_ENV, "").split(",") if p]
    if any(p in shard for p in patterns):
        log.error("fault injection: crashing worker on shard %s", shard)
        os._exit(86)


def default_batch_size(width: int, height: int, device: str = "cpu", low_vram: bool = False) -> int:
    """A batch size from free device memory (model loaded) and the image size.

    Measured on an H200 in bf16 at 1024x1024: a row needs about 2.4 GiB of activations when the
    VAE decodes the whole batch (3 GiB is assumed, with 2 GiB free as headroom); with low_vram,
    where the VAE decodes one row at a time, about 0.1 GiB a row on top of 2 GiB for the decode.
    """
    pixels = width * height
    if str(device).startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        per_image, headroom = (0.25, 2.5) if low_vram else (3.0, 2.0)
        per_image_bytes = per_image * 2**30 * pixels / (1024 * 1024)
        return int(max(1, min(16, (free - headroom * 2**30) // max(per_image_bytes, 1))))
    return int(max(1, min(64, (256 * 256 * 16) // max(pixels, 1))))
