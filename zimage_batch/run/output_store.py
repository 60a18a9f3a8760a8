"""Whether a run may write where it would: OUTPUT must be writable and its conditional writes
must hold (create-only for commit markers, compare-and-swap for the lease), and the folder for
temporary files must have room for a shard. Checked once per run, before any work; the stores
only answer the probes (`Storage.check_writable`, `supports_create_only`,
`supports_compare_and_swap`)."""

from __future__ import annotations

import logging
import shutil
import tempfile

from zimage_batch.storage import MiB, Storage, StorageError

#: The job setting that runs on a store whose create-only writes do not hold.
UNSAFE_OPT_OUT = "unsafe_allow_overwriting_commits"


def check_output_store(storage: Storage, allow_overwriting_commits: bool = False) -> None:
    """Preflight of an OUTPUT, once per run before any work: it must be writable, and its
    conditional writes must hold: create-only for commit markers (each shard's output exactly
    once), compare-and-swap for the lease (one run at a time). A store that ignores them is
    refused in one line unless the job opts out (a single writer at a time, accepting the risk),
    when it is only logged."""
    storage.check_writable()
    if not storage.supports_create_only():
        problem = (f"{storage.location()} ignores create-only writes (it accepted a second PutObject with "
                   f"If-None-Match: * of one key under {storage.uri}), so two runs could both commit a shard "
                   "and exactly-once output cannot be guaranteed")
    elif not storage.supports_compare_and_swap():
        problem = (f"{storage.location()} ignores If-Match (it accepted a PutObject naming another ETag under "
                   f"{storage.uri}), so two runs could both hold the lease that keeps them from writing one OUTPUT "
                   "at once, and exactly-once output cannot be guaranteed")
    else:
        return
    if not allow_overwriting_commits:
        raise StorageError(f"{problem}; use a store that enforces conditional writes, or, if only one run "
                           f"ever writes this OUTPUT at a time, accept the risk with --set {UNSAFE_OPT_OUT}=true")
    logging.getLogger(__name__).warning("%s; running anyway (%s=true)", problem, UNSAFE_OPT_OUT)


def check_scratch_space(needed: int, folder: str | None = None) -> None:
    """Raise StorageError when the folder for temporary files (TMPDIR) has under ``needed`` bytes free."""
    folder = folder or tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if needed and free < needed:
        raise StorageError(
            f"not enough scratch space in {folder}: {free / MiB:.0f} MiB free, a shard needs about "
            f"{needed / MiB:.0f} MiB; set TMPDIR to a larger disk or lower shard_size"
        )
