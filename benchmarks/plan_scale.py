"""Planning and resuming at scale: driver time and peak memory for a huge manifest.

    python benchmarks/plan_scale.py                 # 10,000,000 rows, half the shards committed
    python benchmarks/plan_scale.py --rows 200000   # a quick run

Builds a manifest of N rows in 10 Parquet files and an OUTPUT in which every other shard is
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


def build(root: Path, rows: int, files: int, shard_size: int) -> tuple[Path, Path]:
    from zimage_batch.inputs.manifest import open_manifest, rows_digest
    from zimage_batch.output.ledger import CommitMarker, Ledger
    from zimage_batch.run.plan import make_plan
    from zimage_batch.storage import open_storage

    manifest, output = root / "manifest", root / "out"
    manifest.mkdir()
    per_file = rows // files
    for f in range(files):
        start = f * per_file
        index = np.arange(start, start + per_file)
        ids = pa.array(np.char.add("p", index.astype(str)))
        prompts = pa.array(np.char.add("a photo of object number ", index.astype(str)))
        pq.write_table(pa.table({"id": ids, "prompt": prompts}), manifest / f"part-{f:03d}.parquet", row_group_size=100_000)
    m = open_manifest(str(manifest))
    ledger = Ledger(open_storage(str(output)))
    plan = make_plan(m, {}, shard_size)
    files_by_name = {f.name: f for f in m.files}
    for shard in plan.todo[::2]:
        table = m.read_rows(files_by_name[shard.file], shard.start, shard.end)
        ledger.commit(CommitMarker(shard=shard.name, file=shard.file, start=shard.start, end=shard.end,
                                   rows=shard.num_rows, ok=shard.num_rows, error=0, digest=rows_digest(table),
                                   fingerprint="", format="files"))
    return manifest, output


def measure(manifest: str, output: str, shard_size: int) -> dict:
    """Runs in a fresh process: the driver's work before dispatch."""
    from zimage_batch.inputs.manifest import Limits, open_manifest, validate_manifest
    from zimage_batch.output.ledger import Ledger
    from zimage_batch.run.plan import make_plan
    from zimage_batch.storage import open_storage

    figures = {"rss_after_imports_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    t = time.perf_counter()
    m = open_manifest(manifest)
    validate_manifest(m, Limits("turbo", 1024, 1024, 9, 0.0))
    figures["validate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    committed = Ledger(open_storage(output)).committed()
    figures["read_ledger_s"] = time.perf_counter() - t
    t = time.perf_counter()
    plan = make_plan(m, committed, shard_size)
    figures["plan_s"] = time.perf_counter() - t
    figures |= {"rows": m.num_rows, "shards_committed": len(plan.done), "shards_todo": len(plan.todo),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--measure", nargs=2, metavar=("MANIFEST", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.shard_size)))
        return
    with tempfile.TemporaryDirectory(prefix="plan-scale-") as tmp:
        t = time.perf_counter()
        manifest, output = build(Path(tmp), args.rows, args.files, args.shard_size)
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
        f"driver peak RSS {f['peak_rss_mib']:.0f} MiB (after imports {f['rss_after_imports_mib']:.0f} MiB)"
    )


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main()
