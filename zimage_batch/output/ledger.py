"""The ledger: what OUTPUT already holds, and the one atomic step that makes a shard done.

A shard is done when `_commits/<shard>.json` exists. The marker is created only after the
shard's images and metadata are durable, with a create-only write (S3 `If-None-Match: *`,
local `link`), so two attempts of one shard can never both commit.
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from zimage_batch.storage import Storage, StorageError

COMMITS = "_commits/"
JOB_FILE = "job.json"
# What a job writes, in the order --overwrite removes it: markers first (no half state looks
# done), job.json last (a clear cut short still refuses a plain rerun of another job).
OUTPUT_PREFIXES = ("_commits/", "metadata/", "images/", "shards/", "data/", "_runs/", "report.html", JOB_FILE)


class JobMismatch(RuntimeError):
    """OUTPUT holds a different job."""


def commit_key(shard: str) -> str:
    return f"{COMMITS}{shard}.json"


class Ledger:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def committed_names(self) -> list[str]:
        return [
            info.key[len(COMMITS) : -len(".json")]
            for info in self.storage.list(COMMITS)
            if info.key.endswith(".json")
        ]

    def committed(self) -> dict[str, dict[str, Any]]:
        """Every commit marker, read in parallel."""
        names = self.committed_names()
        with ThreadPoolExecutor(max_workers=32) as pool:
            markers = pool.map(lambda n: self._read_json(commit_key(n)), names)
            return dict(zip(names, markers))

    def _read_json(self, key: str) -> dict[str, Any]:
        try:
            return json.loads(self.storage.get_bytes(key))
        except ValueError as exc:  # never written by a run (writes are atomic): name it
            raise StorageError(f"{self.storage.url(key)} is not valid JSON ({exc}); move it away to go on") from None

    def is_committed(self, shard: str) -> bool:
        return self.storage.exists(commit_key(shard))

    def commit(self, shard: str, marker: dict[str, Any]) -> bool:
        """Create the marker; False when another attempt committed this shard first.

        The marker carries a unique token: when our create landed but its answer was lost, the
        retried create finds the key taken, and reading it back tells that it is ours."""
        data = json.dumps(marker | {"token": uuid.uuid4().hex}, sort_keys=True, ensure_ascii=False).encode()
        if self.storage.put_if_absent(commit_key(shard), data):
            return True
        try:
            return self.storage.get_bytes(commit_key(shard)) == data
        except FileNotFoundError:
            return False

    # ------------------------------------------------------------------ job identity
    def read_job(self) -> dict[str, Any] | None:
        try:
            return self._read_json(JOB_FILE)
        except FileNotFoundError:
            return None

    def claim_output(self, record: dict[str, Any], overwrite: bool) -> None:
        """Refuse an OUTPUT that holds a different job; with overwrite, clear it first.

        `record` is what job.json holds: {"fingerprint": ..., "job": {...}, "output_fields": [...]}.
        """
        previous = self.read_job()
        if previous is not None and not overwrite:
            self._refuse_other_job(previous, record)
        if overwrite and (previous is not None or self.committed_names()):
            self.clear()
            previous = None
        data = json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False).encode()
        if previous is not None:
            self.storage.put_bytes(JOB_FILE, data)
        elif not self.storage.put_if_absent(JOB_FILE, data):  # another run claimed it since we looked
            self._refuse_other_job(self.read_job() or {}, record)

    def _refuse_other_job(self, previous: dict[str, Any], record: dict[str, Any]) -> None:
        if previous.get("fingerprint") == record["fingerprint"]:
            return
        before, now = previous.get("job", {}), record["job"]
        changed = sorted(k for k in record["output_fields"] if before.get(k) != now.get(k))
        raise JobMismatch(
            f"{self.storage.uri} holds a different job (differs in: {', '.join(changed) or 'settings'}); "
            "use another output, or --overwrite to replace it"
        )

    def clear(self) -> None:
        """Remove everything a previous job left, in the order of OUTPUT_PREFIXES."""
        for prefix in OUTPUT_PREFIXES:
            self.storage.delete_prefix(prefix)
