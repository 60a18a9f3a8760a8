"""Every name under OUTPUT, in one place.

    OUTPUT/
      job.json                          the job as resolved, with its fingerprint
      _lease.json                       the run writing OUTPUT now (one writer at a time)
      metadata/<shard>.parquet          one row per manifest row of a committed shard
      images/<shard>/<key>.<ext>        --format files
      shards/<shard>.tar                --format webdataset
      data/<shard>.parquet              --format parquet
      _commits/<shard>.json             the commit marker: the shard is done
      _staging/<shard>/<token>/...      an attempt's files, under their final names, until published
      _runs/<time>.json, plan-<time>.json   figures of each run / totals of each run's plan
      report.html                       the report
      README.md                         the dataset card

An attempt writes every file of its shard under its own staging folder, commits (creating the
marker, which names that folder through its token), then publishes: each staged file is moved
to its final name, a shard's images folder as one (`Storage.publish_folder`), the metadata last.
So `metadata/` and the formats' folders (`images/`, `shards/`, `data/`) only ever hold files of
committed shards, and a reader that globs them never sees an attempt that did not commit. Which
keys a shard of a format has is the format's to say (`output.formats`: `OutputFormat.shard_key`);
this module names them. `_staging/` is emptied by
every run, at its start and end (`Ledger.sweep_staging`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

JOB_FILE = "job.json"
LEASE = "_lease.json"
REPORT = "report.html"
DATASET_CARD = "README.md"
DUPLICATES = "duplicates.parquet"  # zimage-batch dedup: near-duplicate pairs from the stored embeddings
COMMITS = "_commits/"
STAGING = "_staging/"
RUNS = "_runs/"
PLAN_RECORD_PREFIX = "plan-"
METADATA = "metadata/"

# The folders of the output formats' images (each format's module names its own: `OutputFormat.folder`).
IMAGES = "images/"  # --format files
SHARDS = "shards/"  # --format webdataset
DATA = "data/"  # --format parquet


def output_prefixes(format_folders: Iterable[str]) -> tuple[str, ...]:
    """What a job writes, every output format's folder (`format_folders`) included, in the order
    --overwrite removes it: markers first (no half state looks done), job.json last (a clear cut
    short still refuses a plain rerun of another job)."""
    return (COMMITS, METADATA, *format_folders, STAGING, RUNS, REPORT, DATASET_CARD, DUPLICATES, JOB_FILE)


def commit_key(shard: str) -> str:
    return f"{COMMITS}{shard}.json"


def shard_of_commit_key(key: str) -> str | None:
    """The shard a `_commits/` key names, or None for anything else."""
    if key.startswith(COMMITS) and key.endswith(".json"):
        return key[len(COMMITS) : -len(".json")]
    return None


def metadata_key(shard: str) -> str:
    return f"{METADATA}{shard}.parquet"


def shard_of_metadata_key(key: str) -> str | None:
    if key.startswith(METADATA) and key.endswith(".parquet"):
        return key[len(METADATA) : -len(".parquet")]
    return None


def images_prefix(shard: str) -> str:
    """--format files: the folder of a shard's images."""
    return f"{IMAGES}{shard}/"


def image_key(shard: str, key: str, ext: str) -> str:
    """--format files: one image of a shard."""
    return f"{images_prefix(shard)}{key}.{ext}"


MASK_SUFFIX = ".mask.png"  # an edited image's inpaint mask, as used, beside it (keys hold no dots)


def mask_key(shard: str, key: str) -> str:
    """--format files: the inpaint mask of one image of a shard."""
    return f"{images_prefix(shard)}{key}{MASK_SUFFIX}"


def tar_key(shard: str) -> str:
    """--format webdataset: the tar holding a shard's samples."""
    return f"{SHARDS}{shard}.tar"


def parquet_key(shard: str) -> str:
    """--format parquet: the file holding a shard's rows."""
    return f"{DATA}{shard}.parquet"


def run_record_key(name: str) -> str:
    return f"{RUNS}{name}.json"


def plan_record_key(name: str) -> str:
    return f"{RUNS}{PLAN_RECORD_PREFIX}{name}.json"


@dataclass(frozen=True)
class StagingArea:
    """One attempt's staging folder: `_staging/<shard>/<token>/`, holding the attempt's files
    under their final names (so `prefix + final_key` is where a file waits to be published)."""

    shard: str
    token: str

    @property
    def prefix(self) -> str:
        return f"{STAGING}{self.shard}/{self.token}/"

    def final_key(self, staged_key: str) -> str:
        """The final name of a file listed under this staging folder."""
        return staged_key[len(self.prefix) :]


def shard_staging_prefix(shard: str) -> str:
    """Every attempt's staging folder of `shard`."""
    return f"{STAGING}{shard}/"
