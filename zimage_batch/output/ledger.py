"""The ledger: what OUTPUT already holds, and the one atomic step that makes a shard done.

A shard is done when `_commits/<shard>.json` exists. An attempt writes its files under its own
staging folder (`output.layout.StagingArea`), then creates the marker with a create-only write
(S3 `If-None-Match: *`, local `link`), so two attempts of one shard can never both commit; then
it publishes the staged files under their final names. A shard is published when its metadata
is out and `_staging/<shard>/` is empty. A committed shard whose publishing was cut short (its
worker died, deletes failed) is finished by the next attempt of it or by a sweep
(`sweep_staging`), which also removes what attempts that never committed left.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from zimage_batch.output import layout
from zimage_batch.output.formats import FORMATS, get_format
from zimage_batch.storage import Storage, StorageError

log = logging.getLogger(__name__)

MAX_MARKER_ERRORS = 5  # a marker keeps the first few row errors; the metadata has them all


# Values of job settings added later, for a job.json written before they existed.
_UNSET: dict[str, Any] = {"lora": None}


class JobMismatch(RuntimeError):
    """OUTPUT holds a different job."""


@dataclass(frozen=True)
class CommitMarker:
    """`_commits/<shard>.json`: a committed shard, its rows and how they were made."""

    shard: str
    file: str  # the manifest file (ManifestFile.name) the rows come from
    start: int
    end: int
    rows: int  # manifest rows it covers
    ok: int  # images stored (one per row, or num_images per row)
    error: int  # images that failed (error rows of the metadata)
    digest: str  # of the manifest rows, to tell whether they changed since
    fingerprint: str  # of the job
    format: str
    variant: str | None = None  # only this variant's rows of [start, end) (mixed-variant manifests)
    errors: tuple[str, ...] = ()  # the first few row errors
    attempt: int = 1
    worker: str = ""
    started: float = 0.0
    finished: float = 0.0
    busy_s: float = 0.0  # model time
    images: int = 0  # images the shard draws (ok + error); 0 in markers written before num_images: one per row
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # the attempt: names its staging folder
    run: str = ""  # the run that committed it (its lease's fencing token); "" in markers of older versions
    filtered: int = 0  # images a curated job's keep rule turned down on every try (rows without an image)

    @property
    def staging(self) -> layout.StagingArea:
        return layout.StagingArea(self.shard, self.token)

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> CommitMarker:
        """Read a marker; keys it does not know (a newer version's) are ignored."""
        values = json.loads(data)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        values["errors"] = tuple(values.get("errors") or ())
        return cls(**values)


class Ledger:
    #: How long a sweep retries deletes under `_staging/` that fail (with backoff) before giving up.
    STAGING_RETRY_S = 60.0

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    # ------------------------------------------------------------------ commits
    def committed_names(self) -> list[str]:
        names = (layout.shard_of_commit_key(info.key) for info in self.storage.list(layout.COMMITS))
        return [name for name in names if name is not None]

    def committed(self) -> dict[str, CommitMarker]:
        """Every commit marker, read in parallel."""
        names = self.committed_names()
        with ThreadPoolExecutor(max_workers=32) as pool:
            return dict(zip(names, pool.map(self._read_marker, names)))

    def marker(self, shard: str, rows: tuple[int, int] | None = None) -> CommitMarker | None:
        """The shard's commit marker, or None if it is not committed. With `rows` (start, end),
        a marker of that name for another row range is refused: another run writes OUTPUT."""
        try:
            marker = self._read_marker(shard)
        except FileNotFoundError:
            return None
        if rows is not None and (marker.start, marker.end) != tuple(rows):
            raise JobMismatch(
                f"shard {shard} was committed for rows {marker.start}..{marker.end}, not {rows[0]}..{rows[1]}: "
                "another run is writing this OUTPUT"
            )
        return marker

    def ensure_published(self, marker: CommitMarker) -> None:
        """Finish publishing a committed shard whose publishing was cut short."""
        if not self.is_published(marker.shard):
            self.publish(marker)

    def is_published(self, shard: str) -> bool:
        """Its metadata is out (published last) and no staged file of it is left."""
        return (self.storage.exists(layout.metadata_key(shard))
                and next(iter(self.storage.list(layout.shard_staging_prefix(shard))), None) is None)

    def _read_marker(self, shard: str) -> CommitMarker:
        key = layout.commit_key(shard)
        data = self.storage.get_json(key)
        try:
            return CommitMarker.from_json(json.dumps(data))
        except TypeError as exc:  # never written by a run (writes are atomic): name it
            raise self.storage.unreadable(key, exc) from None

    def commit(self, marker: CommitMarker) -> bool:
        """Create the marker; False when another attempt committed this shard first.

        When our create landed but its answer was lost, the retried create finds the key
        taken, and reading it back (the token is unique to the attempt) tells that it is ours."""
        data = marker.to_json()
        key = layout.commit_key(marker.shard)
        if self.storage.put_if_absent(key, data):
            return True
        try:
            return self.storage.get_bytes(key) == data
        except FileNotFoundError:
            return False

    # ------------------------------------------------------------------ publishing
    def publish(self, marker: CommitMarker) -> None:
        """Move the committed attempt's staged files to their final names, then remove every
        staging folder of the shard. A format's folder of a shard's images (`OutputFormat.
        shard_folder`: --format files) moves as one (`Storage.publish_folder`: one rename on local
        disk), single files each by itself, metadata last, so a shard whose metadata is in
        `metadata/` is published whole. Idempotent: a cut-short publish is finished by calling it
        again. A failed removal of the staging folders is only logged: the shard's files are out,
        and the run's closing sweep removes what is left."""
        staging = marker.staging
        folder = get_format(marker.format).shard_folder(marker.shard)
        metadata = layout.metadata_key(marker.shard)
        staged = [info.key for info in self.storage.list(staging.prefix)]
        files = [key for key in staged if folder is None or not staging.final_key(key).startswith(folder)]
        files.sort(key=lambda key: staging.final_key(key) == metadata)
        if len(files) < len(staged):  # the shard's folder of images
            self.storage.publish_folder(staging.prefix + folder, folder)
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda key: self.storage.move(key, staging.final_key(key)), files[:-1]))
        if files:
            self.storage.move(files[-1], staging.final_key(files[-1]))
        try:
            self.storage.delete_prefix(layout.shard_staging_prefix(marker.shard))
        except Exception as exc:  # noqa: BLE001 - published all the same; the sweep retries
            log.warning("shard %s is out, but its staging folder could not be removed (%s); the run's "
                        "closing sweep removes it", marker.shard, exc)

    def published_shards(self) -> set[str]:
        """Shards whose metadata is in `metadata/` (published last, so the shard is whole)."""
        names = (layout.shard_of_metadata_key(info.key) for info in self.storage.list(layout.METADATA))
        return {name for name in names if name is not None}

    def sweep_staging(self, committed: dict[str, CommitMarker] | None = None,
                      echo: Callable[[str], None] = log.info) -> list[str]:
        """Leave `_staging/` empty: finish publishing committed shards with staged files left
        (a killed publish, failed deletes) and remove every other attempt's files, committed
        shard or not. Call it only while no other attempt can write OUTPUT (at the start and the
        end of a run that holds OUTPUT). `committed`: the markers, when the caller has read them
        (else only the markers of shards with leftovers are read). Lists `_staging/` once; deletes
        that fail are retried for `STAGING_RETRY_S`, then a StorageError says what is left.
        Returns the shards it finished publishing."""
        shards = sorted({key.split("/", 2)[1] for key in (info.key for info in self.storage.list(layout.STAGING))
                         if key.count("/") >= 2})
        if not shards:
            return []
        names = set(committed) if committed is not None else set(self.committed_names())
        finished, dead = [], 0
        for shard in shards:
            if shard in names:
                if not self.storage.exists(layout.metadata_key(shard)):  # metadata goes last: not out
                    self.publish(committed[shard] if committed is not None else self._read_marker(shard))
                    finished.append(shard)
                    echo(f"published shard {shard}, committed by an earlier attempt that stopped before publishing it")
            else:
                dead += 1
            self._remove_with_retries(layout.shard_staging_prefix(shard))
        if dead:
            echo(f"removed the staged files of {dead} shard(s) whose attempts never committed")
        return finished

    def _remove_with_retries(self, prefix: str) -> None:
        deadline, delay = time.monotonic() + self.STAGING_RETRY_S, 0.5
        while True:
            try:
                self.storage.delete_prefix(prefix)
                return
            except Exception as exc:  # noqa: BLE001 - any failure: retried, then named
                if time.monotonic() + delay > deadline:
                    raise StorageError(
                        f"could not remove {self.storage.url(prefix)} after {self.STAGING_RETRY_S:.0f}s ({exc}); "
                        "the committed rows are kept, and the next run removes it") from None
                log.warning("removing %s failed (%s); retrying in %.1fs", prefix, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    def forget_lost(self, committed: dict[str, CommitMarker]) -> list[str]:
        """Committed shards that can never be published (metadata not out, nothing staged: a
        repair cut short, files deleted by hand) are taken out whole, so the next plan redraws
        their rows; returns their names. Call it after `sweep_staging`, holding the lease."""
        lost = sorted(set(committed) - self.published_shards())
        for shard in lost:
            self.remove_shard(committed[shard])
        return lost

    def remove_shard(self, marker: CommitMarker) -> None:
        """Take a committed shard out of OUTPUT: its metadata first (readers stop seeing it), its
        images (where its format put them), its staged attempts, then its marker (a cut-short
        removal leaves a marker to find)."""
        fmt = get_format(marker.format)  # an unknown format fails here, before anything is deleted
        self.storage.delete([layout.metadata_key(marker.shard)])
        fmt.remove(self.storage, marker.shard)
        self.storage.delete_prefix(layout.shard_staging_prefix(marker.shard))
        self.storage.delete([layout.commit_key(marker.shard)])

    def remove_staging(self, marker_or_shard: CommitMarker | str) -> None:
        """Give up an attempt (a marker not committed) or every attempt of a shard."""
        if isinstance(marker_or_shard, CommitMarker):
            self.storage.delete_prefix(marker_or_shard.staging.prefix)
        else:
            self.storage.delete_prefix(layout.shard_staging_prefix(marker_or_shard))

    # ------------------------------------------------------------------ job identity
    def read_job(self) -> dict[str, Any] | None:
        try:
            return self.storage.get_json(layout.JOB_FILE)
        except FileNotFoundError:
            return None

    def recorded_adapters(self) -> dict[str, Any]:
        """job.json's LoRA adapters (name -> source, sha256, file); empty without adapters or job.json."""
        return (self.read_job() or {}).get("adapters") or {}

    def claim_output(self, record: dict[str, Any], overwrite: bool) -> None:
        """Refuse an OUTPUT that holds a different job; with overwrite, clear it first.

        `record` is what job.json holds: {"fingerprint": ..., "job": {...}, "output_fields": [...]}.
        """
        previous = self.read_job()
        if previous is not None and not overwrite:
            self._refuse_other_job(previous, record)
            if previous.get("adapters"):  # keep the adapters earlier runs used
                record = record | {"adapters": {**previous["adapters"], **record.get("adapters", {})}}
        if overwrite and (previous is not None or self.committed_names()):
            self.clear()
            previous = None
        data = json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False).encode()
        if previous is not None:
            self.storage.put_bytes(layout.JOB_FILE, data)
        elif not self.storage.put_if_absent(layout.JOB_FILE, data):  # another run claimed it since we looked
            self._refuse_other_job(self.read_job() or {}, record)

    def _refuse_other_job(self, previous: dict[str, Any], record: dict[str, Any]) -> None:
        if previous.get("fingerprint") == record["fingerprint"]:
            self._refuse_changed_adapters(previous, record)
            return
        before, now = previous.get("job", {}), record["job"]
        seen = lambda job, k: bool(job.get(k)) if k == "loras" else job.get(k, _UNSET.get(k))  # noqa: E731
        changed = sorted(k for k in record["output_fields"] if seen(before, k) != seen(now, k))
        raise JobMismatch(
            f"{self.storage.uri} holds a different job (differs in: {', '.join(changed) or 'settings'}); "
            "use another output, or --overwrite to replace it"
        )

    def _refuse_changed_adapters(self, previous: dict[str, Any], record: dict[str, Any]) -> None:
        """An adapter name that OUTPUT's job recorded must still name the same file (sha256);
        adapters new to the job are fine (job.json keeps the earlier ones too)."""
        before = previous.get("adapters") or {}
        for name, now in sorted((record.get("adapters") or {}).items()):
            was = (before.get(name) or {}).get("sha256")
            if was and was != now.get("sha256"):
                raise JobMismatch(
                    f"{self.storage.uri} holds a job whose LoRA adapter {name!r} was another file "
                    f"(sha256 {was[:12]}..., now {now.get('source')} is {str(now.get('sha256'))[:12]}...); "
                    "use another output, or --overwrite to replace it"
                )

    def clear(self) -> None:
        """Remove everything a previous job left, every format's folder included, in the order of
        `layout.output_prefixes`."""
        for prefix in output_prefixes():
            self.storage.delete_prefix(prefix)


def output_prefixes() -> tuple[str, ...]:
    """What a job may have written under OUTPUT (every registered format's folder), in the order
    `Ledger.clear` removes it."""
    return layout.output_prefixes(fmt.folder for fmt in FORMATS.values())
