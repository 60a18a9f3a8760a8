"""The ledger: what OUTPUT already holds, and the one atomic step that makes a shard done.

A shard is done when `_commits/<shard>.json` exists. An attempt writes its files under its own
staging folder (`output.layout.StagingArea`), then creates the marker with a create-only write
(S3 `If-None-Match: *`, local `link`), so two attempts of one shard can never both commit; then
it publishes the staged files under their final names. A committed shard whose publishing was
cut short (its worker died) is published by the next attempt or run (`finish_publishing`).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from zimage_batch.output import layout
from zimage_batch.storage import Storage

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
        """Publish a committed shard whose publishing was cut short (its metadata is not out)."""
        if not self.storage.exists(layout.metadata_key(marker.shard)):
            self.publish(marker)

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
        """Move the committed attempt's staged files to their final names (metadata last, so a
        shard whose metadata is in `metadata/` is published whole), then remove every staging
        folder of the shard. Idempotent: a cut-short publish is finished by calling it again."""
        staging = marker.staging
        staged = [info.key for info in self.storage.list(staging.prefix)]
        metadata = layout.metadata_key(marker.shard)
        staged.sort(key=lambda key: staging.final_key(key) == metadata)
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda key: self.storage.move(key, staging.final_key(key)), staged[:-1]))
        if staged:
            self.storage.move(staged[-1], staging.final_key(staged[-1]))
        self.storage.delete_prefix(layout.shard_staging_prefix(marker.shard))

    def published_shards(self) -> set[str]:
        """Shards whose metadata is in `metadata/` (published last, so the shard is whole)."""
        names = (layout.shard_of_metadata_key(info.key) for info in self.storage.list(layout.METADATA))
        return {name for name in names if name is not None}

    def finish_publishing(self, markers: dict[str, CommitMarker]) -> list[str]:
        """Publish committed shards whose publishing was cut short; returns their names."""
        unpublished = sorted(set(markers) - self.published_shards())
        for name in unpublished:
            self.publish(markers[name])
        return unpublished

    def remove_shard(self, marker: CommitMarker) -> None:
        """Take a committed shard out of OUTPUT: its metadata first (readers stop seeing it), its
        images, its staged attempts, then its marker (a cut-short removal leaves a marker to find)."""
        self.storage.delete([layout.metadata_key(marker.shard)])
        if marker.format == "files":
            self.storage.delete_prefix(layout.images_prefix(marker.shard))
        else:
            self.storage.delete([layout.shard_data_key(marker.shard, marker.format)])
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
        """Remove everything a previous job left, in the order of layout.OUTPUT_PREFIXES."""
        for prefix in layout.OUTPUT_PREFIXES:
            self.storage.delete_prefix(prefix)
