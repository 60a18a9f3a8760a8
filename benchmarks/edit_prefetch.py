"""Does source prefetch keep generation fed when fetching source images is slow?

An edit job (img2img, tiny:turbo) reads its source JPEGs from a real S3 server (moto, on
127.0.0.1), either directly ("instant") or through a proxy that delays every request by
--delay seconds ("delayed", tests/fault_proxy.py). A third run takes the delayed sources with
the worker's prefetch replaced by loading each window in the shard's own thread ("no
prefetch"), to show what the prefetch hides. Each run drives one `ShardRunner` the way its Ray
actor does (two shards in flight, the model behind one lock) and reports rows per second over
the whole run and the fraction of it the engine was generating.

    python benchmarks/edit_prefetch.py [--rows 384] [--delay 0.2] [--size 128] [--repeats 2] [--control]

With --control every row also has its own ControlNet condition image on S3 (`control_image`, a
PNG edge map; delayed like the sources) and the job a tiny ControlNet Union 2.1 (`tiny:2.1`):
the rows run as ControlNet text-to-image, each fetching and decoding two images ahead of the GPU.

The delayed run should stay within 10% of the instant one.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fault_proxy import FaultProxy, endpoint_env  # noqa: E402

from zimage_batch.inputs import images  # noqa: E402
from zimage_batch.inputs.manifest import open_manifest  # noqa: E402
from zimage_batch.jobspec import JobSpec  # noqa: E402
from zimage_batch.model.addons import resolve_addon  # noqa: E402
from zimage_batch.model.sources import resolve_model  # noqa: E402
from zimage_batch.run.plan import make_plan  # noqa: E402
from zimage_batch.run.preflight import resolve  # noqa: E402
from zimage_batch.run.worker import ShardRunner  # noqa: E402
from zimage_batch.storage import open_storage  # noqa: E402

BUCKET = "bench"


def start_s3() -> object:
    """A moto S3 server on 127.0.0.1, with this process's AWS settings pointing at it."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true",
    })
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    return server


def product_photo(i: int, width: int = 1024, height: int = 768) -> bytes:
    """A JPEG about the size of a catalogue photo: smooth shapes and a little noise."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(i)
    rgb = np.stack([(x + 40 * i) % 256, (y * 2 + 13 * i) % 256, (x + y) % 256], -1).astype(float)
    rgb += rng.normal(0, 6, rgb.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def edge_map(i: int, width: int = 512, height: int = 384) -> bytes:
    """A condition image: white outlines of a box on black, as a canny preprocessor draws them."""
    edges = np.zeros((height, width), np.uint8)
    top, left = 40 + i % 50, 60 + (i * 7) % 80
    edges[top, left:-left] = edges[-top, left:-left] = edges[top:-top, left] = edges[top:-top, -left] = 255
    buffer = io.BytesIO()
    Image.fromarray(edges, "L").save(buffer, "PNG")
    return buffer.getvalue()


def setup(rows: int, size: int, workdir: Path, control: bool = False) -> Path:
    from zimage_batch.storage import s3_client

    s3_client().create_bucket(Bucket=BUCKET)
    store = open_storage(f"s3://{BUCKET}/sources")
    for i in range(rows):
        store.put_bytes(f"{i:05d}.jpg", product_photo(i))
        if control:
            store.put_bytes(f"edges/{i:05d}.png", edge_map(i))
    manifest = workdir / "edits.parquet"
    columns = {"control_image": [f"s3://{BUCKET}/sources/edges/{i:05d}.png" for i in range(rows)]} if control else {}
    pq.write_table(pa.table(columns | {
        "id": [f"sku-{i:05d}" for i in range(rows)],
        "source": [f"s3://{BUCKET}/sources/{i:05d}.jpg" for i in range(rows)],
        "prompt": [f"the same product on a white background #{i}" for i in range(rows)],
        "seed": pa.array(range(rows), pa.int64()),
        "width": pa.array([size] * rows, pa.int64()),
        "height": pa.array([size] * rows, pa.int64()),
    }), manifest)
    return manifest


def serial_prefetch(pool, items, load, window, first=None):
    """The prefetch switched off: each window is loaded in the caller's thread, one row at a time."""
    for start in range(0, len(items), window):
        yield [(i, load(items[i])) for i in range(start, min(start + window, len(items)))]


def run(manifest: Path, workdir: Path, label: str, shard_size: int, batch_size: int, controlnet: str | None = None) -> dict:
    job = JobSpec(manifest=str(manifest), output=str(workdir / f"out-{label}-{time.time_ns()}"), model="tiny:turbo",
                  variant="turbo", batch_size=batch_size, shard_size=shard_size, controlnet=controlnet)
    runner = ShardRunner(resolve(job).worker_settings("turbo"), threads=1)
    shards = make_plan(open_manifest(str(manifest)), {}, shard_size).todo
    started, busy = time.perf_counter(), runner.engine.busy_seconds
    with ThreadPoolExecutor(max_workers=2) as actor:  # the actor's max_concurrency: two shards in flight
        markers = list(actor.map(runner.run_shard, shards))
    wall = time.perf_counter() - started
    rows = sum(m.rows for m in markers)
    assert sum(m.ok for m in markers) == rows, [m.errors for m in markers]
    return {"rows_per_s": rows / wall, "busy": (runner.engine.busy_seconds - busy) / wall, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--delay", type=float, default=0.2, help="seconds added to every source request")
    parser.add_argument("--size", type=int, default=128, help="output side in pixels")
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--control", action="store_true", help="rows with ControlNet condition images (tiny:2.1)")
    args = parser.parse_args()
    controlnet = "tiny:2.1" if args.control else None
    warnings.simplefilter("ignore")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    server = start_s3()
    direct = os.environ["AWS_ENDPOINT_URL"]
    resolve_model("tiny:turbo")  # build the tiny checkpoints once, before any timing
    if controlnet:
        resolve_addon(controlnet)
    results: dict[str, list[dict]] = {"instant": [], "delayed": [], "no prefetch": []}
    real_prefetch = images.prefetch
    try:
        with tempfile.TemporaryDirectory() as tmp, FaultProxy(direct, rate=1.0, kinds=("slow",), delay=args.delay) as proxy:
            workdir = Path(tmp)
            manifest = setup(args.rows, args.size, workdir, args.control)
            shape = (args.shard_size, args.batch_size, controlnet)
            run(manifest, workdir, "warmup", *shape)
            for _ in range(args.repeats):
                results["instant"].append(run(manifest, workdir, "instant", *shape))
                with endpoint_env(proxy.url):
                    results["delayed"].append(run(manifest, workdir, "delayed", *shape))
            with endpoint_env(proxy.url):  # slow: once is enough to show the difference
                images.prefetch = serial_prefetch
                try:
                    results["no prefetch"].append(run(manifest, workdir, "serial", *shape))
                finally:
                    images.prefetch = real_prefetch
            delayed_requests = proxy.stats()[1].get("slow", 0)
    finally:
        server.stop()

    task = "ControlNet (tiny:2.1) rows with 512x384 PNG condition images" if args.control else "img2img"
    print(f"edit prefetch benchmark: {args.rows} rows {task} on tiny:turbo at {args.size}x{args.size}, "
          f"1024x768 JPEG sources on S3, batch {args.batch_size}, shards of {args.shard_size}, "
          f"{os.cpu_count()} CPUs; delay {args.delay * 1000:.0f} ms on each of {delayed_requests} delayed requests")
    best = {}
    for label, runs in results.items():
        best[label] = max(r["rows_per_s"] for r in runs)
        each = ", ".join(f"{r['rows_per_s']:.1f}" for r in runs)
        busy = max(r["busy"] for r in runs)
        print(f"  {label:12s} best {best[label]:6.2f} rows/s (runs: {each}); engine busy up to {busy:.0%} of the run")
    ratio = best["delayed"] / best["instant"]
    print(f"delayed / instant = {ratio:.3f} ({'within' if ratio >= 0.9 else 'NOT within'} 10%); "
          f"no prefetch / instant = {best['no prefetch'] / best['instant']:.3f}")


if __name__ == "__main__":
    main()
