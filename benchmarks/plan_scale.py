"""Planning and resuming at scale: driver time and peak memory for a huge manifest.

    python benchmarks/plan_scale.py                      # 10,000,000 rows, half the shards committed
    python benchmarks/plan_scale.py --rows 100000000     # 10^8 rows (about 3 GB of Parquet in TMPDIR)
    python benchmarks/plan_scale.py --rows 200000        # a quick run

Builds a manifest of N rows in a folder of Parquet files (--files, default 10) and an OUTPUT in which every other shard is
committed (markers with real row digests, as a previous run leaves them), then measures in a
fresh process what the driver does before dispatching: open + validate the manifest, read the
ledger, make the plan (which re-checks the committed shards' rows). Prints seconds per step and
the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHUNK_ROWS = 1_000_000  # rows generated and written at a time (bounds the build's memory)


def _write_file(path: Path, start: int, rows: int) -> None:
    """`rows` rows with ids p<start>.. and a prompt each, written a chunk at a time."""
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for lo in range(start, start + rows, CHUNK_ROWS):
            index = np.arange(lo, min(lo + CHUNK_ROWS, start + rows)).astype(str)
            table = pa.table({"id": np.char.add("p", index), "prompt": np.char.add("a photo of object number ", index)},
                             schema=schema)
            writer.write_table(table, row_group_size=100_000)


def _shard_tables(m, f, shard_size: int):
    """(start, rows) of each shard-size range of one file, streamed."""
    buffer, start = None, 0
    for batch in m.iter_batches(f):
        table = pa.Table.from_batches([batch])
        buffer = table if buffer is None else pa.concat_tables([buffer, table])
        while buffer.num_rows >= shard_size:
            yield start, buffer.slice(0, shard_size)
            buffer, start = buffer.slice(shard_size), start + shard_size
    if buffer is not None and buffer.num_rows:
        yield start, buffer


def build(root: Path, rows: int, files: int, shard_size: int) -> tuple[Path, Path]:
    """A manifest of `rows` rows in `files` files, and an OUTPUT with every other shard committed
    (markers with the real digests of their rows, read back the way the plan re-reads them)."""
    from zimage_batch.inputs.identity import rows_digest
    from zimage_batch.inputs.manifest import open_manifest
    from zimage_batch.output.ledger import CommitMarker, Ledger
    from zimage_batch.run.plan import shard_name
    from zimage_batch.storage import open_storage

    manifest, output = root / "manifest", root / "out"
    manifest.mkdir()
    per_file = rows // files
    for f in range(files):
        _write_file(manifest / f"part-{f:03d}.parquet", f * per_file, per_file)
    m = open_manifest(str(manifest))
    ledger = Ledger(open_storage(str(output)))
    for f in m.files:
        for start, table in _shard_tables(m, f, shard_size):
            if (start // shard_size) % 2 == 0:
                ledger.commit(CommitMarker(shard=shard_name(f, start), file=f.name, start=start,
                                           end=start + table.num_rows, rows=table.num_rows, ok=table.num_rows,
                                           error=0, digest=rows_digest(table), fingerprint="", format="files"))
    return manifest, output


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: on Linux ru_maxrss survives
    exec, so a child started by a parent that built 10^8 rows would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(manifest: str, output: str, shard_size: int) -> dict:
    """Runs in a fresh process: the driver's work before dispatch."""
    from zimage_batch.inputs.manifest import open_manifest
    from zimage_batch.inputs.validation import Limits, validate_manifest
    from zimage_batch.output.ledger import Ledger
    from zimage_batch.run.plan import make_plan
    from zimage_batch.storage import open_storage

    figures = {"rss_after_imports_mib": peak_rss_mib()}
    t = time.perf_counter()
    m = open_manifest(manifest)
    validate_manifest(m, Limits("turbo", 1024, 1024, 9, 0.0))
    figures["validate_s"] = time.perf_counter() - t
    figures["peak_after_validate_mib"] = peak_rss_mib()
    t = time.perf_counter()
    committed = Ledger(open_storage(output)).committed()
    figures["read_ledger_s"] = time.perf_counter() - t
    figures["peak_after_ledger_mib"] = peak_rss_mib()
    t = time.perf_counter()
    plan = make_plan(m, committed, shard_size)
    figures["plan_s"] = time.perf_counter() - t
    figures |= {"rows": m.num_rows, "shards_committed": len(plan.done), "shards_todo": len(plan.todo),
                "peak_rss_mib": peak_rss_mib()}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--workdir", help="keep the manifest and OUTPUT here (built once, reused by later runs)")
    parser.add_argument("--measure", nargs=2, metavar=("MANIFEST", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.shard_size)))
        return
    with tempfile.TemporaryDirectory(prefix="plan-scale-") as tmp:
        root = Path(args.workdir or tmp)
        manifest, output = root / "manifest", root / "out"
        if not manifest.is_dir():
            root.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            build(root, args.rows, args.files, args.shard_size)
            print(f"built {args.rows:,} rows and half the commit markers in {time.perf_counter() - t:.1f}s")
        out = subprocess.run(
            [sys.executable, __file__, "--shard-size", str(args.shard_size), "--measure", str(manifest), str(output)],
            check=True, capture_output=True, text=True,
        ).stdout
        f = json.loads(out.strip().splitlines()[-1])
    print(
        f"rows={f['rows']:,} shards committed={f['shards_committed']:,} todo={f['shards_todo']:,}\n"
        f"validate {f['validate_s']:.1f}s | read ledger {f['read_ledger_s']:.1f}s | plan (re-check committed rows) "
        f"{f['plan_s']:.1f}s | total {f['validate_s'] + f['read_ledger_s'] + f['plan_s']:.1f}s\n"
        f"driver peak RSS {f['peak_rss_mib']:.0f} MiB (after imports {f['rss_after_imports_mib']:.0f} MiB, "
        f"validate {f['peak_after_validate_mib']:.0f} MiB, ledger {f['peak_after_ledger_mib']:.0f} MiB)"
    )


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main()
