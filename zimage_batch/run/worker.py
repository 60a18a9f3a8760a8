"""A worker: one loaded model that turns a shard into images, metadata and a commit marker.

`ShardRunner` is plain Python (testable without Ray); the driver runs it as a threaded Ray
actor so that one shard's reading, encoding, uploads and commit overlap the next shard's
generation, while the model itself runs one batch at a time on a dedicated thread.

An attempt stages every file under its own folder (`output.layout.StagingArea`), writes the
metadata there last, creates the commit marker, then publishes: readers of `metadata/`,
`shards/`, `data/` and `images/` only ever see committed shards.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import platform
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from zimage_batch import scratch
from zimage_batch.curate.judge import ShardJudge
from zimage_batch.curate.scorers import Scorers
from zimage_batch.curate.spec import FILTERED
from zimage_batch.generate.controlnet import ControlNetEngine
from zimage_batch.generate.edit import EditEngine
from zimage_batch.generate.engine import Engine, default_device, low_vram_needed
from zimage_batch.generate.expansion import PromptExpander
from zimage_batch.generate.requests import GenerationRequest
from zimage_batch.generate.segmenter import Segmenter
from zimage_batch.inputs.identity import rows_digest, rows_of_variant
from zimage_batch.inputs.manifest import open_manifest
from zimage_batch.inputs.mask_spec import has_alpha_rows, masks_used, uses_words
from zimage_batch.inputs.templates import TemplateManifest
from zimage_batch.model.adapters import adapter_files
from zimage_batch.model.addons import resolve_pinned
from zimage_batch.model.prompt_model import resolve_prompt_model
from zimage_batch.model.sources import resolve_model
from zimage_batch.output import layout
from zimage_batch.output.encoding import Encoding
from zimage_batch.output.features import sample_fields
from zimage_batch.output.lease import LeaseLost, check_fence
from zimage_batch.output.ledger import MAX_MARKER_ERRORS, CommitMarker, Ledger
from zimage_batch.output.metadata import metadata_table, parquet_bytes
from zimage_batch.output.writers import make_writer
from zimage_batch.run import metrics
from zimage_batch.run.batching import BatchSizer
from zimage_batch.run.generation import ShardGeneration, WorkerModel
from zimage_batch.run.heartbeat import ProgressCounter
from zimage_batch.run.plan import Shard
from zimage_batch.run.rows import expand_rows, images_of_row, request_for_row, row_record
from zimage_batch.run.settings import WorkerSettings
from zimage_batch.storage import open_storage
from zimage_batch.threads import background_pool

log = logging.getLogger(__name__)

SOURCE_THREADS = 16  # source fetches and decodes in flight per worker


class ShardRunner:
    """Runs shards of one job on one loaded model."""

    def __init__(self, settings: WorkerSettings, threads: int | None = None, index: int = 0,
                 progress: ProgressCounter | None = None) -> None:
        """`index`: the worker's place in its pool (the slow-worker drill slows place 0);
        `progress`: what the worker's heartbeat reads (ticked by batches and shard steps)."""
        self.slowdown = _slow_worker_factor() if index == 0 else 1.0
        self.progress = progress or ProgressCounter()
        if threads:
            torch.set_num_threads(threads)
        # Temporary files in this process's own folder, removed on SIGINT/SIGTERM; the folders of
        # this node's workers that were killed (SIGKILL, OOM) are removed here.
        scratch.claim(signals=True)
        self.settings = settings
        self.manifest = TemplateManifest(settings.template) if settings.template else open_manifest(settings.job.manifest)
        self.files = {f.name: f for f in self.manifest.files}
        self.edit = self.manifest.kind == "edit"  # the edit path draws edit requests too
        self.image_index = self.manifest.uses_num_images(settings.defaults.get("num_images", 1))
        # Resolved here, on the worker's node: a hub or S3 model is fetched into this node's cache.
        model_path = resolve_model(settings.model, settings.variant).path
        device = settings.job.device or default_device()
        # LoRA: every declared adapter fetched on this node (checked against job.json), loaded once
        adapters = adapter_files(settings.job.loras, Ledger(open_storage(settings.job.output)).recorded_adapters())
        # ControlNet (issue 18): loaded beside the model, the very weights the job's fingerprint
        # names; its engine draws every kind of request.
        control = settings.control
        self.controlnet = resolve_pinned(control.controlnet, control.controlnet_id) if control else None
        # Curation (issue 27): the scorer checkpoints the job's fingerprint names, on the same device
        self.curation = settings.curation
        self.curated = self.curation.metadata_columns() if self.curation else None
        self.expanded = bool(settings.job.prompt_expansion)  # rows' prompts rewritten by a causal LM first
        # catalogue editing: an edit job that derives masks keeps each mask as used (metadata, <key>.mask.png)
        self.keep_masks = self.edit and masks_used(self.manifest.schema.names, settings.masks, self._alpha_rows())
        self.sample_fields = sample_fields(self.manifest.metadata_schema(  # what a Parquet data row carries
            self.image_index, lora=bool(settings.job.loras), control=self.controlnet is not None, curated=self.curated,
            expanded=self.expanded, masks=self.keep_masks))
        self.engine = (ControlNetEngine if self.controlnet else EditEngine if self.edit else Engine)(
            model_path,
            settings.variant,
            device=device,
            attention_backend=settings.job.attention_backend,
            compile=settings.job.compile,
            low_vram=settings.job.low_vram == "on" or (settings.job.low_vram == "auto" and low_vram_needed(device)),
            adapters=adapters,
            **({"controlnet_path": self.controlnet.path} if self.controlnet else {}),
        )
        self.scorers = Scorers(self.curation, device) if self.curation else None
        self.expander = _load_expander(settings, device) if self.expanded else None
        self.expansion_s = 0.0  # time spent expanding prompts (on the model thread)
        # Each batch is sized from its own shape (rows x pixels) against the device's memory,
        # measured once with the model loaded; warm-up runs on a shape the job will run.
        self.batch_sizes = BatchSizer.measure(settings.job.batch_size, device, self.engine.low_vram)
        self.warm_shape = self._first_shape()
        self.batch_size = self.batch_sizes.size(*self.warm_shape)
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
        self.storage = open_storage(settings.job.output)
        self.ledger = Ledger(self.storage)
        self.worker_id = f"{platform.node()}:{os.getpid()}"
        self.model = WorkerModel(
            self.engine, settings, self.batch_size, self.model_thread,
            encoder=background_pool(2, "encode"),
            # Images are handed to the writer on one thread, in row order (tar members and
            # metadata stay deterministic), while the model thread goes on to the next batch.
            storer=background_pool(1, "store"),
            sources=background_pool(SOURCE_THREADS, "source") if self.edit or self.controlnet else None,
            passthrough_names=frozenset(self.manifest.passthrough.names),
            worker_id=self.worker_id,
            batch_sizes=self.batch_sizes,
            progress=self.progress,
            masks=settings.masks if self.keep_masks else None,
            segmenter=self._segmenter(device),
        )
        self.first_shard_started: float | None = None

    def _alpha_rows(self) -> bool:
        """Whether any row of an edit manifest asks for its mask from the source's alpha."""
        if not self.edit or "mask" not in self.manifest.schema.names:
            return False
        return has_alpha_rows(self.manifest.read_column(f, "mask") for f in self.manifest.files)

    def _segmenter(self, device: str) -> Segmenter | None:
        """Masks from words: the job's CLIPSeg, the very weights its fingerprint names, on the model's device."""
        masks = self.settings.masks
        if not (self.edit and uses_words(self.manifest.schema.names, masks)):
            return None
        return Segmenter(resolve_pinned(masks.segmenter_source, masks.segmenter_id, "segmenter").path, device)

    def _first_shape(self) -> tuple[int, int]:
        """(width, height) of the manifest's first row (the job's defaults where it has none, and
        for edit rows, whose size follows their source)."""
        d = self.settings.defaults
        first = self.manifest.files[0]
        rows = [] if self.edit or not first.num_rows else self.manifest.read_rows(first, 0, 1).to_pylist()
        row = rows[0] if rows else {}
        return int(row.get("width") or d["width"]), int(row.get("height") or d["height"])

    def _warm_up(self) -> None:
        """One short generation on a shape the job runs, so first-call costs (kernel selection,
        lazy initialisation, compilation) do not land on the first shard."""
        width, height = self.warm_shape
        self.engine.generate([GenerationRequest("warm-up", 0, width, height, 2, 0.0)], batch_size=1)
        self.engine.busy_seconds = 0.0
        self.engine.prompts.encoded = 0

    # ------------------------------------------------------------------ one shard
    def run_shard(self, shard: Shard, attempt: int = 1) -> CommitMarker | None:
        """Generate, stage, commit and publish one shard; returns the shard's commit marker: the
        one this attempt committed, or the one another attempt had (a copy, or an attempt whose
        answer was lost), whose publishing this attempt finishes. None only if neither holds."""
        if (committed := self._committed_marker(shard)) is not None:
            return committed
        _inject_fault(CRASH_ENV, shard.name)
        self.progress.tick(shard.name)
        started = time.time()
        self.first_shard_started = self.first_shard_started or started
        file = self.files[shard.file]
        table = self.manifest.read_rows(file, shard.start, shard.end)
        if shard.variant is not None:
            table = rows_of_variant(table, shard.variant, self.settings.job_variant)
        rows = table.to_pylist()
        images, origin = expand_rows(rows, self.settings, self.image_index)  # one entry per image to draw
        if self.expander is not None:
            images = self._expand_prompts(images)
        requests = [request_for_row(row, self.settings, self.engine.variant, self.edit) for row in images]
        base = posixpath.dirname(self.manifest.display_name(file))  # for relative sources
        marker = CommitMarker(
            shard=shard.name, file=shard.file, start=shard.start, end=shard.end, variant=shard.variant,
            rows=len(rows), images=len(images), ok=0, error=0, digest=rows_digest(table),
            fingerprint=self.settings.fingerprint, format=self.settings.job.format, attempt=attempt, worker=self.worker_id,
            started=started, run=self.settings.run or "",
        )
        staged = self.storage.child(marker.staging.prefix)
        job = self.settings.job
        writer = make_writer(job.format, staged, shard.name, Encoding.of_job(job),
                             fields=self.sample_fields)  # a Parquet row carries its metadata
        if self.expanded and self.settings.job.caption == "original":
            writer.caption_field = "prompt_original"  # the caption: the prompt before expansion
        try:
            judge = ShardJudge(self.curation, self.scorers, images, [images_of_row(row, self.settings) for row in images]
                               ) if self.scorers else None
            watch = _AttemptWatch(self.ledger, shard.name, self.slowdown)
            generation = ShardGeneration(self.model, images, requests, writer, base, judge, shard=shard.name,
                                         before_batch=watch)
            outcomes = generation.run()
            writer.close()
            self.progress.tick()
            records = [row_record(row, request, self.settings) | outcome
                       for row, request, outcome in zip(images, requests, outcomes)]
            rows_of_images = table if len(images) == len(rows) else table.take(origin)
            metadata = metadata_table(records, rows_of_images, self.manifest.passthrough, self.edit,
                                      lora=bool(self.settings.job.loras), control=self.controlnet is not None,
                                      image_index=self.image_index, curated=self.curated, expanded=self.expanded,
                                      masks=self.keep_masks)
            staged.put_bytes(layout.metadata_key(shard.name), parquet_bytes(metadata))
        except Superseded:  # another attempt (a speculative copy, or the first) committed the shard
            writer.abort()
            self._give_up(marker)
            return self._committed_marker(shard)
        except BaseException:
            writer.abort()
            self._give_up(marker)
            raise
        ok = sum(1 for o in outcomes if o["status"] == "ok")
        filtered = sum(1 for o in outcomes if o["status"] == FILTERED)
        errors = tuple(o["error"] for o in outcomes if o["error"])[:MAX_MARKER_ERRORS]
        marker = dataclasses.replace(marker, ok=ok, error=len(images) - ok - filtered, filtered=filtered, errors=errors,
                                     finished=time.time(), busy_s=generation.busy_s)
        _inject_fault(FAIL_BEFORE_COMMIT_ENV, shard.name)
        self.progress.tick()
        try:
            check_fence(self.storage, self.settings.run)  # a run that lost OUTPUT's lease commits nothing
        except LeaseLost:
            self._give_up(marker)
            raise
        if not self.ledger.commit(marker):  # another attempt of this shard won while we worked
            self._give_up(marker)
            return self._committed_marker(shard)  # its publishing finished, if it was cut short
        # Lost the lease between the look and the commit (paused meanwhile): the marker stays
        # unpublished for the lease's holder to judge (docs/architecture.md, "One writer per OUTPUT").
        check_fence(self.storage, self.settings.run)
        self.ledger.publish(marker)
        self.progress.tick()
        metrics.rows_done(self.worker_id, ok, len(images) - ok)
        return marker

    def _expand_prompts(self, rows: list[dict]) -> list[dict]:
        """Each row with its prompt expanded and the original in `prompt_original`: the shard's
        distinct prompts, on the model thread (before the text encoder), greedy, so that a
        rerun of the shard draws from the same prompts. The expansions are committed in its metadata."""
        started = time.perf_counter()
        distinct = list(dict.fromkeys(row["prompt"] for row in rows))
        expanded = dict(zip(distinct, self.model_thread.submit(self.expander.expand, distinct).result()))
        self.expansion_s += time.perf_counter() - started
        return [{**row, "prompt": expanded[row["prompt"]], "prompt_original": row["prompt"]} for row in rows]

    def _committed_marker(self, shard: Shard) -> CommitMarker | None:
        """The shard's marker if it is committed, its publishing finished if it was cut short,
        and what a killed attempt left in staging removed (a worker replaced mid-publish)."""
        marker = self.ledger.marker(shard.name, (shard.start, shard.end))
        if marker is not None:
            self.ledger.ensure_published(marker)
            self.ledger.remove_staging(shard.name)
        return marker

    def _give_up(self, marker: CommitMarker) -> None:
        """Remove what this attempt staged (best effort: a later commit of the shard removes it too)."""
        try:
            self.ledger.remove_staging(marker)
        except Exception:  # noqa: BLE001 - never hide the attempt's own outcome or error
            log.exception("removing the staged files of shard %s failed", marker.shard)

    # ------------------------------------------------------------------ figures
    def stats(self) -> dict[str, float | str]:
        """Device busy fraction: time generating over wall time since this worker's first shard."""
        since = self.first_shard_started or time.time()
        wall = time.time() - since
        return {"worker": self.worker_id, "busy_s": self.engine.busy_seconds, "wall_s": wall,
                "expansion_s": self.expansion_s,
                "busy_fraction": min(1.0, self.engine.busy_seconds / wall) if wall else 0.0}


def _load_expander(settings: WorkerSettings, device: str) -> PromptExpander:
    """The job's expansion model, fetched on this node: the very weights its fingerprint names."""
    path = resolve_prompt_model(settings.job.prompt_expansion or "", settings.job.prompt_expansion_id).path
    return PromptExpander(path, device, settings.job.prompt_expansion_instructions, settings.job.max_new_tokens)


SUPERSEDED_CHECK_S = 1.0  # at most this often, between batches, an attempt looks for another's commit


class Superseded(Exception):
    """Another attempt of the shard committed while this one ran: this one stops, nothing new."""


class _AttemptWatch:
    """Runs before each batch of an attempt: stops it (`Superseded`) once another attempt of
    the shard has committed (the scheduler ran a second copy and stopped waiting for this one),
    and slows the slow-worker drill's worker down."""

    def __init__(self, ledger: Ledger, shard: str, slowdown: float) -> None:
        self.ledger, self.shard, self.slowdown = ledger, shard, slowdown
        self.last = self.looked = time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        if self.slowdown > 1:
            time.sleep((self.slowdown - 1) * (now - self.last))
            now = time.monotonic()
        self.last = now
        if now - self.looked >= SUPERSEDED_CHECK_S:
            self.looked = now
            if self.ledger.marker(self.shard) is not None:
                raise Superseded(f"shard {self.shard} was committed by another attempt")


# Fault injection for drills and tests: shards whose name contains one of the comma-separated
# strings in these variables crash their worker process when they start (CRASH_ENV), or fail
# with an error once everything is staged, just before the commit (FAIL_BEFORE_COMMIT_ENV).
CRASH_ENV = "ZIMAGE_BATCH_FAULT_CRASH_SHARDS"
FAIL_BEFORE_COMMIT_ENV = "ZIMAGE_BATCH_FAULT_FAIL_BEFORE_COMMIT"
# The worker in place 0 of its pool runs this many times slower (it pauses before each batch).
SLOW_WORKER_ENV = "ZIMAGE_BATCH_FAULT_SLOW_WORKER"


def _slow_worker_factor() -> float:
    value = os.environ.get(SLOW_WORKER_ENV, "").strip()
    if not value:
        return 1.0
    log.error("fault injection (%s): this worker runs %sx slower", SLOW_WORKER_ENV, value)
    return max(1.0, float(value))


def _inject_fault(variable: str, shard: str) -> None:
    patterns = [p for p in os.environ.get(variable, "").split(",") if p]
    if not any(p in shard for p in patterns):
        return
    log.error("fault injection (%s): shard %s", variable, shard)
    if variable == CRASH_ENV:
        os._exit(86)
    raise RuntimeError(f"injected failure before the commit of shard {shard}")
