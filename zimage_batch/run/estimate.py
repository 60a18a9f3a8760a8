"""What a job will cost, said before any work starts (`run` and `validate`).

    cost: 100,000 rows, 400,000 images (400,000 to generate); about 111.1 GPU-hours at 1.00 s/image (...)

The seconds per image come from ``--set gpu_seconds_per_image=S`` when given, else from the
latest run recorded in ``OUTPUT/_runs/`` on the same model and default size (its images over
its generation time, summed over devices, as its throughput line said). Without either, the
line says how to get an estimate instead of guessing one.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from zimage_batch.inputs.identity import variant_mask
from zimage_batch.inputs.manifest import Manifest
from zimage_batch.output import layout
from zimage_batch.run.plan import Shard
from zimage_batch.storage import Storage, StorageError

NOISE_NOTE = ("note: model {model} is a tiny random-init checkpoint: its images will be noise "
              "(for tests and demos; give --model Tongyi-MAI/Z-Image-Turbo for real images)")


@dataclass(frozen=True)
class Rate:
    """Device seconds per image, and where the figure comes from."""

    seconds_per_image: float
    device: str  # GPU | CPU
    basis: str


@dataclass(frozen=True)
class Estimate:
    rows: int
    images: int
    images_todo: int
    rate: Rate | None

    def line(self) -> str:
        counts = f"cost: {self.rows:,} rows, {self.images:,} images"
        if self.images_todo != self.images:
            counts += f" ({self.images_todo:,} to generate)"
        if self.rate is None:
            return f"{counts}; no time estimate: give --set gpu_seconds_per_image=S (device seconds per image)"
        hours = self.images_todo * self.rate.seconds_per_image / 3600
        return (f"{counts}; about {hours:,.2f} {self.rate.device}-hours at {self.rate.seconds_per_image:.3g} "
                f"s/image ({self.rate.basis})")


def run_key(model: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs' seconds per image comparable: the model and the default image size."""
    return {"model": model, "width": defaults.get("width"), "height": defaults.get("height")}


def rate_from_runs(storage: Storage, key: dict[str, Any]) -> Rate | None:
    """The latest ended run in OUTPUT/_runs/ with the same `run_key` that generated images."""
    best: dict[str, Any] | None = None
    for info in storage.list(layout.RUNS):
        name = info.key[len(layout.RUNS):]
        if not name.endswith(".json") or name.startswith(layout.PLAN_RECORD_PREFIX):
            continue
        try:
            record = storage.get_json(info.key)
        except (FileNotFoundError, StorageError):
            continue
        throughput = record.get("throughput") or {}
        if record.get("run_key") != key or not throughput.get("images") or not throughput.get("generation_s"):
            continue
        if best is None or record.get("finished", 0) > best.get("finished", 0):
            best = record
    if best is None:
        return None
    t = best["throughput"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(best.get("finished", 0)))
    return Rate(t["generation_s"] / t["images"], best.get("device") or "GPU",
                f"measured by the run of {when} in this OUTPUT: {t['images']:,} images")


def estimate(rows: int, images: int, images_todo: int, seconds_per_image: float | None,
             storage: Storage | None = None, key: dict[str, Any] | None = None) -> Estimate:
    """The cost of `images_todo` images: from the job's setting, else from earlier runs in `storage`."""
    if seconds_per_image:
        rate = Rate(seconds_per_image, "GPU", "gpu_seconds_per_image")
    else:
        rate = rate_from_runs(storage, key or {}) if storage is not None else None
    return Estimate(rows, images, images_todo, rate)


def count_images(manifest: Manifest, default: int, todo: list[Shard] = (), job_variant: str | None = None) -> tuple[int, int]:
    """(images of the whole manifest, images of the `todo` shards): each row draws its
    `num_images` (the job's `default` where empty). Reads only that column (and `variant` for
    mixed-variant shards), streaming."""
    if "num_images" not in manifest.schema.names:
        return manifest.num_rows * default, sum(s.num_rows for s in todo) * default
    total = todo_images = 0
    for f in manifest.files:
        mine = sorted((s for s in todo if s.file == f.name), key=lambda s: s.start)
        starts = [s.start for s in mine]
        span = max((s.end - s.start for s in mine), default=0)  # shards of two variants may share a start
        columns = ["num_images"] + (["variant"] if any(s.variant for s in mine) else [])
        offset = 0
        for batch in manifest.iter_batches(f, columns=columns):
            counts = _counts(batch, default)
            total += int(counts.sum())
            masks: dict[str, np.ndarray] = {}  # per variant, for this batch
            first = bisect.bisect_left(starts, offset - span + 1)  # the first shard that can reach this batch
            for shard in mine[first:bisect.bisect_left(starts, offset + len(counts))]:
                lo, hi = max(shard.start, offset) - offset, min(shard.end, offset + len(counts)) - offset
                if hi <= lo:
                    continue
                part = counts[lo:hi]
                if shard.variant is not None:
                    if shard.variant not in masks:
                        masks[shard.variant] = np.asarray(variant_mask(batch, shard.variant, job_variant))
                    part = part[masks[shard.variant][lo:hi]]
                todo_images += int(part.sum())
            offset += len(counts)
    return total, todo_images


def _counts(batch: pa.RecordBatch, default: int) -> np.ndarray:
    if "num_images" not in batch.schema.names:
        return np.full(batch.num_rows, default, np.int64)
    return np.asarray(pc.fill_null(pc.cast(batch.column("num_images"), pa.int64()), default))

